"""Checkpoint readers and writers: each returns plain parts (config, state dict, normalizers) and
``assembly`` builds the policy from them, so no reader depends on another."""
