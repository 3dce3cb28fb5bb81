"""Inference engines for the denoiser: the same network, compiled, behind the ``denoiser(sample, t, cond)`` slot.

Why: at batch 1 eager PyTorch runs the PushT U-Net at a few percent of this kind of CPU's fp32 rate (about 150
small operators, each dispatched from Python); an ahead-of-time compiled graph runs the same arithmetic several times
faster per call. The solvers then multiply on top. Every engine here is exact in float32 (tested: max |engine -
eager| <= :data:`EXACT_TOLERANCE` per call); ``precision="bf16"`` is the one approximate option and is labelled so.

* ``torch``: the module itself (eager).
* ``openvino``: the module exported to ONNX (dynamic batch) and compiled by OpenVINO for the CPU with ``f32``
  inference precision. The default on CPU (``auto``).
* ``onnxruntime``: exported to ONNX (opset 17, dynamic batch), served by ONNX Runtime's CPU provider (an extra).
* ``cuda_graphs``: one captured CUDA graph per padded batch size (:mod:`policy_accel.model.graphs`); ``auto`` on CUDA.

Converted networks are cached on disk (``$POLICY_ACCEL_CACHE``, default ``~/.cache/policy_accel``), keyed by the
weights, the shapes, the engine and its version, so only the first start of a network pays for the conversion.
Forward-mode dual inputs (Newton's ``derivatives=forward_ad``) carry tangents no compiled graph propagates: those
calls run the eager module, which gives the same Jacobians as without an engine.

An image policy's observation encoder runs once per inference; ``openvino`` serves it too (:func:`compile_encoder`,
f32 whatever the denoiser's precision), the other engines leave it eager.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.autograd import forward_ad

from policy_accel.errors import ConfigError

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "openvino", "onnxruntime", "cuda_graphs")
CPU_ENGINES = ("openvino", "onnxruntime")  # compiled engines that run on the CPU's cores, beside torch's threads
PRECISIONS = ("f32", "bf16")
EXACT_TOLERANCE = 1e-5  # max |engine - eager| per call, float32 (the engines' tested contract)
_INPUT_NAMES = ("sample", "timestep", "global_cond")


@dataclass(frozen=True)
class EngineInfo:
    """What serves the denoiser, for results.json and reports."""

    name: str  # torch | openvino | onnxruntime | cuda_graphs
    version: str
    precision: str  # f32 (exact) | bf16 (approximate)
    threads: int
    compile_s: float = 0.0  # conversion + compilation at this start (0 for torch)
    fused_chains: bool = False  # short sequential chains run as one compiled program each
    cache_hit: bool = False  # the converted network came from the disk cache
    encoder: str = "none"  # what serves an image policy's observation encoder: none | torch | openvino

    @property
    def approximate(self) -> bool:
        return self.precision != "f32"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "precision": self.precision,
            "threads": self.threads,
            "compile_s": round(self.compile_s, 4),
            "cache_hit": self.cache_hit,
            "fused_chains": self.fused_chains,
            "encoder": self.encoder,
            "approximate": self.approximate,
        }


def available(name: str) -> bool:
    """Whether engine ``name`` can run here (its package imports; CUDA graphs need a GPU)."""
    if name == "torch":
        return True
    onnx = importlib.util.find_spec("onnx") is not None  # torch's ONNX exporter writes through it
    if name == "openvino":
        return onnx and importlib.util.find_spec("openvino") is not None
    if name == "onnxruntime":
        return onnx and importlib.util.find_spec("onnxruntime") is not None
    if name == "cuda_graphs":
        return torch.cuda.is_available()
    return False


def resolve_engine(name: str, device: torch.device | str) -> str:
    """``auto`` -> the fastest exact engine for ``device`` (measured: ``eval/latency.py``); others checked."""
    if name not in ENGINES:
        raise ConfigError(f"engine={name!r} is not allowed: expected one of {', '.join(ENGINES)}")
    kind = torch.device(device).type
    if name == "auto":
        if kind == "cuda":
            return "cuda_graphs"
        return "openvino" if kind == "cpu" and available("openvino") else "torch"
    if name in CPU_ENGINES and kind != "cpu":
        raise ConfigError(f"engine={name} runs on the CPU only, but device={device}")
    if name == "cuda_graphs" and kind != "cuda":
        raise ConfigError(f"engine=cuda_graphs needs device=cuda, got device={device}")
    if not available(name):
        extra = {"onnxruntime": "pip install -e '.[onnxruntime]'"}.get(name, "")
        raise ConfigError(f"engine={name} is not installed here" + (f" ({extra})" if extra else ""))
    return name


def cache_root() -> Path:
    return Path(os.environ.get("POLICY_ACCEL_CACHE") or Path.home() / ".cache" / "policy_accel") / "engines"


def network_key(model: nn.Module, sample_shape: tuple[int, ...], cond_dim: int, tag: str) -> str:
    """A digest of everything that makes a converted network differ: weights, shapes, engine and versions."""
    digest = hashlib.sha256()
    # repr(model): the module tree with its settings (e.g. which channels an inpainting step overwrites)
    digest.update(f"{model!r}|{sample_shape}|{cond_dim}|{tag}|torch {torch.__version__}".encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        # reshape: a 0-dim tensor (a BatchNorm count) has no byte view of its own; same bytes for every other
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:24]


def _cached_artifact(key_dir: Path, filename: str, write) -> tuple[Path, bool]:
    """``key_dir/filename``, written once by ``write(tmp_path)`` into a temporary folder renamed into place, so
    that a killed or concurrent start never leaves a half-written network behind."""
    target = key_dir / filename
    if target.exists():
        return target, True
    key_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=key_dir.name + ".", dir=key_dir.parent))
    try:
        write(tmp / filename)
        try:
            os.replace(tmp, key_dir)
        except OSError:  # another start finished first: keep its copy
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, False


def _openvino_ir(key_dir: Path, filename: str, module: nn.Module, example: tuple, names: tuple[str, ...]):
    """(``module`` as an OpenVINO IR file in the disk cache, whether it was there): exported to ONNX, converted in
    f32 (fp16 weights would be inexact) and written once."""
    import openvino as ov

    def convert(path: Path) -> None:
        onnx_path = path.with_suffix(".onnx")
        export_onnx(module, example, names, onnx_path)
        ov.save_model(ov.Core().read_model(onnx_path), path, compress_to_fp16=False)
        onnx_path.unlink()

    return _cached_artifact(key_dir, filename, convert)


def _openvino_core(root: Path, version: str, threads: int, precision: str) -> tuple[object, dict]:
    """An OpenVINO core with its compiled blobs cached on disk (a second start skips compilation too; one folder per
    engine build), and the CPU plugin settings of every program compiled here."""
    import openvino as ov

    core = ov.Core()
    core.set_property({"CACHE_DIR": str(root / f"openvino-blobs-{version}")})
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision,
    }
    return core, config


def _infer(local: threading.local, key: object, program, inputs: tuple, out_shape: tuple[int, ...]) -> torch.Tensor:
    """Run ``program`` on float32 CPU ``inputs`` (shared, not copied) with this thread's infer request for ``key``
    (the real-time controller plans in a worker thread: requests are never shared between threads), its output
    written straight into a new torch tensor of ``out_shape``."""
    import openvino as ov

    requests = local.__dict__.setdefault("requests", {})
    request = requests.get(key)
    if request is None:
        request = requests[key] = program.create_infer_request()
    out = torch.empty(out_shape, dtype=torch.float32)
    request.set_output_tensor(0, ov.Tensor(out.numpy(), shared_memory=True))
    request.infer(tuple(x.numpy() for x in inputs), share_inputs=True, share_outputs=True)
    return out


@contextlib.contextmanager
def _quiet_export():
    """Tracing warns about Python-level branches it records (the timestep's shape): expected here, and a command
    that ends with an error must show that one line only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        yield


def export_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], names: tuple[str, ...], path: Path) -> None:
    """``module`` as ONNX (opset 17, batch dimension dynamic: axis 0 of every input but a chain's noise, axis 1 there).

    Both CPU engines read this file: OpenVINO's ONNX reader gives a faster graph of the U-Net than its PyTorch
    frontend here (1.1 vs 1.9 ms at batch 1, 25 vs 37 ms at batch 100: GroupNorm is decomposed into ops it fuses).
    """
    dynamic = {name: {1 if name == "xi" else 0: "batch"} for name in names}
    dynamic["out"] = {1 if "xi" in names else 0: "batch"}
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=list(names),
            output_names=["out"],
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )


def _example_inputs(model: nn.Module, sample_shape: tuple[int, ...], cond_dim: int, batch: int = 2):
    device = next(model.parameters()).device
    return (
        torch.zeros((batch, *sample_shape), device=device),
        torch.zeros((batch,), device=device),
        torch.zeros((batch, cond_dim), device=device),
    )


class CompiledDenoiser:
    """Drop-in ``denoiser(sample, timestep, global_cond)``: float32 CPU tensors in, a new tensor out."""

    def __init__(self, model: nn.Module, info: EngineInfo):
        self.model = model
        self.info = info

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        if forward_ad.unpack_dual(sample).tangent is not None:
            return self.model(sample, timestep, global_cond)  # Newton's forward-mode Jacobians
        n = sample.shape[0]
        t = torch.as_tensor(timestep)
        t = (t.expand(n) if t.ndim == 0 else t).to(torch.float32)  # the network reads t.float() first
        return self._run(
            sample.detach().to(torch.float32).contiguous(),
            t.contiguous(),
            global_cond.detach().to(torch.float32).contiguous(),
        )

    def _run(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


MAX_FUSED_STEPS = 16  # longer chains make one program too large to compile quickly (DDPM-100: 100 U-Nets)
MAX_FUSED_BYTES = 1_000_000_000  # weights x steps of one fused program (its ONNX file is limited to 2 GB)


class _SequentialChain(nn.Module):
    """A fixed sampler's whole one-step chain, unrolled: (x_T, xi, cond) -> every state (T + 1, B, H, A).

    The same arithmetic as :class:`~policy_accel.solvers.sequential.SequentialSolver` (``schedule.step`` plus the
    drawn noise ``xi_j``), so that one compiled program replaces T calls and the Python between them.
    """

    def __init__(self, model: nn.Module, schedule) -> None:
        super().__init__()
        self.model = model
        self.schedule = schedule

    def forward(self, x_T: torch.Tensor, xi: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        states = [x_T]
        y = x_T
        rows = torch.zeros_like(x_T[:, 0, 0], dtype=torch.long)  # (B,): the batch size stays dynamic
        for j in range(self.schedule.num_steps):
            index = rows + j
            eps = self.model(y, self.schedule.timesteps[index], cond)
            y = self.schedule.step(y, eps, index) + xi[j]
            states.append(y)
        return torch.stack(states)


def fusable(schedule) -> bool:
    """Whether one program can run ``schedule``'s chain: a one-step sampler of at most MAX_FUSED_STEPS steps."""
    return not schedule.is_multistep and schedule.num_steps <= MAX_FUSED_STEPS


# Batch sizes served by a static-shape program (powers of two and 1.5x them, up to 4096): OpenVINO's CPU plugin runs
# a static shape 1.3-2x faster than its dynamic-batch model (committed U-Net, this CPU: 1.98 vs 2.51 ms at batch 1,
# 4.5 vs 8.8 at 16, 19.3 vs 29.0 at 100, 633 vs 816 at 3300). Other sizes are padded up to the next one (at most
# 1.5x the rows; rows are independent: the U-Net normalises per sample).
STATIC_BATCHES = tuple(sorted({1 << k for k in range(13)} | {3 << k for k in range(11)}))
MAX_STATIC_BYTES = 2_000_000_000  # weights held by the static programs together (each holds its own copy)


# From this many rows a call's cost grows with its rows (throughput-bound), so padding up wastes time in proportion
# (100 rows padded to 128: 28 % more work; DP's original-size U-Net ran 0.97-1.01x eager at 100 rows that way): such
# a call between two sizes runs as the largest size below it plus the rest, exactly (rows are independent).
SPLIT_MIN_ROWS = 64


def static_batch(rows: int) -> int | None:
    """The static program size that serves a call of ``rows`` rows, or None (beyond the largest: dynamic)."""
    return next((b for b in STATIC_BATCHES if b >= rows), None)


def split_rows(rows: int) -> int | None:
    """Where a call of ``rows`` rows splits (the largest static size below it), or None (one call, padded up)."""
    if rows < SPLIT_MIN_ROWS or rows in STATIC_BATCHES or rows > STATIC_BATCHES[-1]:
        return None
    return max(b for b in STATIC_BATCHES if b < rows)


class OpenVINODenoiser(CompiledDenoiser):
    """OpenVINO's CPU plugin, f32 (exact) or bf16 (approximate) inference precision.

    Each call runs the static-shape program of its batch size (:data:`STATIC_BATCHES`; compiled on first use, about
    0.2 s for the committed U-Net, blobs cached on disk; batch 1 at start), padded up where the size falls between
    two (from :data:`SPLIT_MIN_ROWS` rows: split into the size below and the rest); ``static_shapes=False``, sizes
    past the largest, and sizes once the programs hold MAX_STATIC_BYTES of weights use one dynamic-batch program.
    Inputs are shared with the torch tensors and the output is written straight into a torch tensor (no copies but
    the padding and a split call's concatenation); each thread gets its own infer requests (the real-time
    controller plans in a worker thread). ``fuse_chains``: a sequential solve of a short one-step sampler runs as
    one program (:meth:`chain`).
    """

    def __init__(
        self,
        model: nn.Module,
        sample_shape: tuple[int, ...],
        cond_dim: int,
        threads: int,
        precision: str = "f32",
        cache_dir: Path | None = None,
        fuse_chains: bool = False,
        static_shapes: bool = True,
    ):
        import openvino as ov

        start = time.perf_counter()
        version = ov.get_version().split("-")[0]
        key = network_key(model, sample_shape, cond_dim, f"openvino {version}")
        root = cache_dir or cache_root()
        example = _example_inputs(model, sample_shape, cond_dim)
        xml, hit = _openvino_ir(root / f"openvino-{key}", "denoiser.xml", model, example, _INPUT_NAMES)
        core, config = _openvino_core(root, version, threads, precision)
        self._compiled = core.compile_model(core.read_model(xml), "CPU", config)
        self._local = threading.local()
        self._out_tail = tuple(sample_shape)
        self._cond_dim = cond_dim
        self._key, self._cache_dir, self._core, self._config = key, root, core, config
        self._xml = xml
        self._chains: dict[str, object] = {}
        self.fuse_chains = fuse_chains
        # static programs by batch size; None: that size runs on the dynamic program
        self._static: dict[int, object] = {}
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self._max_static = max(1, MAX_STATIC_BYTES // max(weight_bytes, 1)) if static_shapes else 0
        self._static_lock = threading.Lock()
        self.static_shapes = static_shapes
        if static_shapes:
            self._program(1)
        seconds = time.perf_counter() - start
        info = EngineInfo(
            "openvino", version, precision, threads, compile_s=seconds, cache_hit=hit, fused_chains=fuse_chains
        )
        super().__init__(model, info)

    def chain(self, schedule, compile: bool = False) -> _ChainProgram | None:
        """The compiled program of ``schedule``'s whole sequential chain, or None where there is none.

        ``compile=True`` builds it (cached on disk): done by a session before its first inference, so that a solve
        never compiles inside a control loop; a solve asks with ``compile=False`` and runs call by call when the
        chain was not prepared (fusing off, a multistep or long sampler, a chain chosen per inference)."""
        if not self.fuse_chains or not fusable(schedule) or schedule.device.type != "cpu":
            return None
        if schedule.num_steps * sum(p.numel() * 4 for p in self.model.parameters()) > MAX_FUSED_BYTES:
            return None  # one copy of the weights per step: ONNX files stop at 2 GB (DP's original size, 65 M)
        tag = json.dumps(schedule.describe(), sort_keys=True)
        program = self._chains.get(tag)
        if program is None and compile:
            program = self._chains[tag] = self._compile_chain(schedule, tag)
        return program

    def _compile_chain(self, schedule, tag: str) -> _ChainProgram:
        T, shape = schedule.num_steps, self._out_tail
        key = hashlib.sha256(f"{self._key}|chain|{tag}".encode()).hexdigest()[:24]
        example = (torch.zeros(2, *shape), torch.zeros(T, 2, *shape), torch.zeros(2, self._cond_dim))
        chain = _SequentialChain(self.model, schedule.to("cpu"))
        xml, _ = _openvino_ir(
            self._cache_dir / f"openvino-chain-{key}", "chain.xml", chain, example, ("x_T", "xi", "cond")
        )
        return _ChainProgram(self._core.compile_model(self._core.read_model(xml), "CPU", self._config), T, shape)

    def _program(self, rows: int) -> tuple[int | None, object]:
        """(static size, program) for a call of ``rows`` rows: (None, the dynamic program) where none is static."""
        size = static_batch(rows) if self._max_static else None
        if size is None:
            return None, self._compiled
        program = self._static.get(size)
        if program is None and size not in self._static:
            with self._static_lock:
                if size not in self._static:
                    self._static[size] = self._compile_static(size) if len(self._static) < self._max_static else None
                program = self._static[size]
        return (size, program) if program is not None else (None, self._compiled)

    def _compile_static(self, size: int):
        """The static program of ``size`` rows, or None where OpenVINO cannot build one (that size runs dynamic)."""
        model = self._core.read_model(self._xml)
        model.reshape({"sample": [size, *self._out_tail], "timestep": [size], "global_cond": [size, self._cond_dim]})
        # OpenVINO 2026.4's fused-subgraph code generator ("snippets") refuses some static U-Nets (seen: "Supported
        # precisions set is not available for Mish operation" on a 32-64-128 U-Net): compile those without it.
        for extra in ({}, {"SNIPPETS_MODE": "DISABLE"}):
            try:
                return self._core.compile_model(model, "CPU", {**self._config, **extra})
            except RuntimeError:
                continue
        return None

    def _run(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n = sample.shape[0]
        head = split_rows(n) if self._max_static else None
        if head is not None:
            return torch.cat(
                [
                    self._run(sample[:head], timestep[:head], cond[:head]),
                    self._run(sample[head:], timestep[head:], cond[head:]),
                ]
            )
        size, program = self._program(n)
        inputs = (sample, timestep, cond)
        if size is not None and size != n:  # pad up to the program's size: zero rows, computed and dropped
            inputs = tuple(torch.cat([x, x.new_zeros(size - n, *x.shape[1:])]) for x in inputs)
        out = _infer(self._local, size, program, inputs, (size or n, *self._out_tail))
        return out if size is None or size == n else out[:n]


class _ChainProgram:
    """One compiled sequential chain: (x_T, xi, cond) -> trajectory (T + 1, B, H, A), written into a torch tensor."""

    def __init__(self, compiled, num_steps: int, sample_shape: tuple[int, ...]):
        self._compiled, self._T, self._shape = compiled, num_steps, sample_shape
        self._local = threading.local()

    def __call__(self, x_T: torch.Tensor, xi: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        inputs = tuple(x.float().contiguous() for x in (x_T, xi, cond))
        return _infer(self._local, None, self._compiled, inputs, (self._T + 1, x_T.shape[0], *self._shape))


class OnnxRuntimeDenoiser(CompiledDenoiser):
    """ONNX Runtime's CPU execution provider on the network exported to ONNX (opset 17, dynamic batch)."""

    def __init__(
        self, model: nn.Module, sample_shape: tuple[int, ...], cond_dim: int, threads: int, cache_dir: Path | None
    ):
        import onnxruntime as ort

        start = time.perf_counter()
        key = network_key(model, sample_shape, cond_dim, f"onnxruntime {ort.__version__}")

        def export(path: Path) -> None:
            export_onnx(model, _example_inputs(model, sample_shape, cond_dim), _INPUT_NAMES, path)

        path, hit = _cached_artifact((cache_dir or cache_root()) / f"onnxruntime-{key}", "denoiser.onnx", export)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # its idle threads otherwise spin after every call, on the cores torch's sampler steps need (measured: the
        # eager calls timed between ONNX Runtime's ran 1.9x slower)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        super().__init__(
            model,
            EngineInfo(
                "onnxruntime", ort.__version__, "f32", threads, compile_s=time.perf_counter() - start, cache_hit=hit
            ),
        )

    def _run(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        feeds = dict(zip(_INPUT_NAMES, (sample.numpy(), timestep.numpy(), cond.numpy()), strict=True))
        return torch.from_numpy(np.asarray(self._session.run(None, feeds)[0]))


class _EncoderGraph(nn.Module):
    """The encoder with positional inputs (an exported graph takes no dicts): each camera's images, then the low-dim
    vector when the policy has one."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.cameras = encoder.config.camera_names
        self.has_low_dim = bool(encoder.config.low_dim)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        images = dict(zip(self.cameras, inputs[: len(self.cameras)], strict=True))
        return self.encoder(images, inputs[len(self.cameras)] if self.has_low_dim else None)


class OpenVINOEncoder:
    """An image policy's observation encoder on OpenVINO's CPU plugin, f32, one static-shape program per batch size
    seen (a controller's 1, a scoring run's group; compiled on first use), inputs shared with the torch tensors.

    Why: eager at one thread (torch's setting while a CPU engine serves the denoiser) the quarter-width PushT image
    encoder took 3.6 ms per batch-1 inference, as long as three OpenVINO denoiser calls; compiled 0.83 ms, 1.2e-7
    off (quiet probe, AMD EPYC)."""

    def __init__(self, encoder: nn.Module, n_obs_steps: int, threads: int, cache_dir: Path | None = None):
        import openvino as ov

        start = time.perf_counter()
        # eval() on the wrapper: the exporter puts the module it is given back into that module's mode, recursively
        graph = _EncoderGraph(encoder).eval()
        config = encoder.config
        self._cameras = config.camera_names
        self._steps = [(n_obs_steps, *shape) for _, shape in config.cameras]
        if config.low_dim:
            self._steps.append((n_obs_steps, config.low_dim_total))
        self._names = tuple(f"camera_{k}" for k in range(len(config.cameras))) + (
            ("low_dim",) if config.low_dim else ()
        )
        example = tuple(torch.zeros((2, *shape)) for shape in self._steps)
        with torch.inference_mode():
            self._feature_dim = int(graph(*example).shape[1])
        version = ov.get_version().split("-")[0]
        key = network_key(graph, tuple(self._steps), self._feature_dim, f"openvino encoder {version}")
        root = cache_dir or cache_root()
        self._xml, hit = _openvino_ir(root / f"openvino-{key}", "encoder.xml", graph, example, self._names)
        self._core, self._config = _openvino_core(root, version, threads, "f32")
        self._programs: dict[int, object] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._program(1)  # a controller's size, compiled now rather than in the first inference
        self.compile_s, self.cache_hit = time.perf_counter() - start, hit

    def _program(self, rows: int):
        program = self._programs.get(rows)
        if program is None:
            with self._lock:
                if rows not in self._programs:
                    model = self._core.read_model(self._xml)
                    model.reshape({n: [rows, *shape] for n, shape in zip(self._names, self._steps, strict=True)})
                    self._programs[rows] = self._core.compile_model(model, "CPU", self._config)
                program = self._programs[rows]
        return program

    def __call__(self, images: dict[str, torch.Tensor], low_dim: torch.Tensor | None) -> torch.Tensor:
        inputs = [images[name].detach().to(torch.float32).contiguous() for name in self._cameras]
        if low_dim is not None:
            inputs.append(low_dim.detach().to(torch.float32).contiguous())
        rows = inputs[0].shape[0]
        return _infer(self._local, rows, self._program(rows), tuple(inputs), (rows, self._feature_dim))


def compile_encoder(
    encoder: nn.Module, engine: str, *, n_obs_steps: int, threads: int, cache_dir: Path | None = None
) -> tuple[object, str]:
    """(what serves ``encoder``, its engine's name): OpenVINO's program where the denoiser's engine is ``openvino``,
    else the module itself (ONNX Runtime and CUDA graphs serve the denoiser only)."""
    if engine != "openvino":
        return encoder.eval(), "torch"
    return OpenVINOEncoder(encoder, n_obs_steps, threads, cache_dir), "openvino"


def compile_denoiser(
    model: nn.Module,
    engine: str,
    *,
    sample_shape: tuple[int, ...],
    cond_dim: int,
    threads: int | None = None,
    precision: str = "f32",
    cache_dir: Path | None = None,
    fuse_chains: bool = False,
    static_shapes: bool = True,
):
    """The callable that serves ``model`` on ``engine`` (already resolved: not ``auto``) and its :class:`EngineInfo`.

    ``threads``: the engine's intra-op threads (default: torch's current setting, so ``threads=`` in a run config
    governs both). ``fuse_chains`` (OpenVINO): sequential solves of short one-step samplers run as one program each
    (compiled when a session starts: 10-60 s the first time a sampler is seen, then cached). ``static_shapes``
    (OpenVINO): one static-shape program per batch size bucket (:data:`STATIC_BATCHES`); False: one dynamic program.
    """
    threads = torch.get_num_threads() if threads is None else threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads={threads!r} is not allowed: expected an integer >= 1")
    if precision not in PRECISIONS:
        raise ConfigError(f"engine_precision={precision!r} is not allowed: expected one of {', '.join(PRECISIONS)}")
    if precision != "f32" and engine != "openvino":
        raise ConfigError(f"engine_precision={precision} is offered by engine=openvino only, not {engine}")
    if fuse_chains is not False and (fuse_chains is not True or engine != "openvino"):
        raise ConfigError(f"engine_fuse={fuse_chains!r} is not allowed: true is offered by engine=openvino only")
    model = model.eval()
    if engine == "torch":
        return model, EngineInfo("torch", torch.__version__, "f32", threads)
    if engine == "openvino":
        served = OpenVINODenoiser(
            model, sample_shape, cond_dim, threads, precision, cache_dir, fuse_chains, static_shapes
        )
        return served, served.info
    if engine == "onnxruntime":
        served = OnnxRuntimeDenoiser(model, sample_shape, cond_dim, threads, cache_dir)
        return served, served.info
    if engine == "cuda_graphs":
        from policy_accel.model.graphs import GraphedDenoiser

        return GraphedDenoiser(model), EngineInfo("cuda_graphs", torch.__version__, "f32", threads)
    raise ConfigError(f"engine={engine!r} is not allowed: expected one of {', '.join(ENGINES[1:])}")


__all__ = [
    "CPU_ENGINES",
    "ENGINES",
    "EXACT_TOLERANCE",
    "MAX_FUSED_STEPS",
    "PRECISIONS",
    "STATIC_BATCHES",
    "CompiledDenoiser",
    "EngineInfo",
    "available",
    "cache_root",
    "compile_denoiser",
    "compile_encoder",
    "fusable",
    "network_key",
    "resolve_engine",
    "static_batch",
]
