"""Running the toolkit from a config: one ``build_session(cfg)`` (``build``), named configurations, the offline
episode loop, results and fronts, the real-time loop's options, tasks, timing and the hardware description."""
