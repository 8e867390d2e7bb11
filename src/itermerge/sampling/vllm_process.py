"""The vLLM backend as a run uses it: each process's engine runs in a process of its own, one per rank.

Why a process (issue 23 items 4, 5, 7), read in vLLM 0.32's source and measured on its CPU build:

- vLLM's teardown ends the launcher's process group. ``InprocClient`` registers ``weakref.finalize(self,
  engine_core.shutdown)``; ``EngineCore.shutdown`` calls ``cleanup_dist_env_and_memory``, whose
  ``destroy_distributed_environment`` calls ``torch.distributed.destroy_process_group()`` on the default group
  whoever made it. Dropping an in-process engine under ``accelerate launch`` therefore destroyed accelerate's
  group, and the next ``wait_for_everyone`` raised "Default process group has not been initialized".
- An engine's memory is not all given back in its process: +110 MB of host memory a build/close cycle on the CPU
  build, and on a GPU most of ``gpu_memory_utilization`` stays held (vLLM issue 21073).

In a process of its own the engine has no launcher to harm (the launcher's variables are removed from its
environment, so each rank's engine is a plain one-process engine: data-parallel, tensor-parallel 1, on the GPU of
its ``LOCAL_RANK`` through ``CUDA_VISIBLE_DEVICES``), and everything it took goes back when it exits. The cost:
weights loaded in place (``update_weights``) travel through a safetensors file in the temporary directory
(``TMPDIR``; 16 GB for an 8B model in bf16) and are read back by the engine's process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itermerge.errors import ItermergeError
from itermerge.sampling.params import Sample, Sampler, SamplingParams
from itermerge.sampling.vllm import device_memory, launch_env

if TYPE_CHECKING:
    from itermerge.config import RunConfig
    from itermerge.devices import Placement

# What torchrun / accelerate launch set for the run's processes; the engine's process gets none of them.
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_NAME", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_")
CLOSE_SECONDS = 120  # an engine's process that has not exited this long after close() is killed


def engine_env(environ: Mapping[str, str], world_size: int, local_rank: int) -> dict[str, str]:
    """The environment of a rank's engine process: the run's, less the launcher's variables, with this rank's GPU
    alone visible (under a launcher) and this itermerge importable."""
    env = {k: v for k, v in environ.items() if k not in LAUNCH_VARIABLES and not k.startswith(LAUNCH_PREFIXES)}
    if world_size > 1:
        visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if visible and local_rank >= len(visible):
            raise ItermergeError(
                f"LOCAL_RANK = {local_rank} but CUDA_VISIBLE_DEVICES = {environ['CUDA_VISIBLE_DEVICES']!r} names "
                f"{len(visible)} device(s): launch at most {len(visible)} processes per node, or list more devices"
            )
        env["CUDA_VISIBLE_DEVICES"] = visible[local_rank] if visible else str(local_rank)
    source = str(Path(__file__).resolve().parents[2])  # the folder holding this itermerge package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, environ.get("PYTHONPATH", "")) if p)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in the engine's process: reloadable
    return env


def weights_for_file(named_tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """(name, tensor) pairs as safetensors writes them: detached, on the CPU, contiguous, and no two sharing memory
    (a tied output layer is the input embedding's tensor; safetensors refuses shared tensors, so it is copied).
    Tensors already on the CPU are not copied otherwise."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for name, tensor in items:
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()  # views of one storage (a fused weight's parts) count as shared
        out[str(name)] = t.clone() if storage in seen else t
        seen.add(storage)
    return out


class VLLMSampler:
    """A vLLM engine in a process of its own (see the module's docstring), with the ``Sampler`` methods.

    Under ``accelerate launch`` / torchrun every rank starts its own engine on its own GPU and samples only the
    prompts it is given (the caller shards them); samples depend on each prompt's seed, not on its shard.
    ``close()`` (or the end of a ``with`` block) ends the process and returns the device memory seen afterwards.
    """

    def __init__(self, model_path: str, *, progress: bool = True, reloadable: bool = False, **engine: Any) -> None:
        """``engine``: ``VLLMEngine``'s settings (tensor_parallel_size, gpu_memory_utilization, dtype,
        engine_options); its seed is the rank."""
        self.world_size, self.rank, local_rank = launch_env()
        tensor_parallel_size = engine.get("tensor_parallel_size", 1)
        if self.world_size > 1 and tensor_parallel_size != 1:
            raise ItermergeError(
                f"sampling.tensor_parallel_size = {tensor_parallel_size} under a {self.world_size}-process launch: "
                "each process runs its own engine on its own GPU, so set it to 1 (or launch one process "
                "to split a model too large for one GPU)"
            )
        options = dict(engine, model_path=str(model_path), progress=progress and self.rank == 0, seed=self.rank,
                       reloadable=reloadable)
        env = engine_env(os.environ, self.world_size, local_rank)
        ours, theirs = socket.socketpair()
        with theirs:
            self.process: subprocess.Popen | None = subprocess.Popen(
                [sys.executable, "-m", "itermerge.sampling.vllm_process", str(theirs.fileno())],
                env=env, pass_fds=(theirs.fileno(),))
        self._conn: Connection | None = Connection(ours.detach())
        self.exit_code: int | None = None
        self.memory_after_close: dict[str, float] = {}
        self._conn.send(options)
        self.eos_ids: list[int] = self._reply("building the engine")

    def _reply(self, what: str, message: Any = None) -> Any:
        """The engine's answer (to ``message``, sent first when given), or its error named as it came back."""
        try:
            if message is not None:
                self._conn.send(message)
            status, value = self._conn.recv()
        except (EOFError, OSError) as err:
            code = self.process.wait()
            self._conn, self.process, self.exit_code = None, None, code
            raise ItermergeError(
                f"vLLM engine process: it ended while {what}, exit code {code} (its log is above); "
                "a negative code is the signal that ended it (-9: killed, often for memory)"
            ) from err
        if status == "error":
            raise ItermergeError(f"vLLM engine process, {what}: {value}")
        return value

    def _call(self, method: str, *args: Any) -> Any:
        if self._conn is None:
            raise ItermergeError(
                f"VLLMSampler.{method}: the engine was closed (close() or the end of its `with` block); "
                "build a new VLLMSampler"
            )
        return self._reply(method, (method, args))

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """``params.n`` samples per prompt, in prompt order."""
        if self._conn is not None and not prompt_ids:
            return []
        return self._call("generate", [list(ids) for ids in prompt_ids], params)

    def update_weights(self, named_tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> int:
        """Load new weights into the running engine (named as in the Hugging Face checkpoint); returns how many.

        They go through a safetensors file in a temporary folder, removed once the engine has loaded them."""
        tensors = weights_for_file(named_tensors)
        if not tensors:
            raise ItermergeError("VLLMSampler.update_weights: no tensors given; pass the state dict to load")
        from safetensors.torch import save_file

        folder = tempfile.mkdtemp(prefix="itermerge-weights-")
        try:
            save_file(tensors, os.path.join(folder, "model.safetensors"))
            return self._call("update_weights", os.path.join(folder, "model.safetensors"))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> dict[str, float]:
        """End the engine's process; returns (and keeps) this process's view of the GPU afterwards."""
        if self.process is None:
            return self.memory_after_close
        with contextlib.suppress(ItermergeError, OSError):
            self._call("close")
        if self._conn is not None:
            self._conn.close()
        try:
            self.exit_code = self.process.wait(timeout=CLOSE_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exit_code = self.process.wait()
        self.process = self._conn = None
        self.memory_after_close = device_memory()
        return self.memory_after_close

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def engine_settings(cfg: RunConfig, where: Placement) -> dict[str, Any]:
    """``VLLMSampler``'s keyword arguments from the run's config."""
    return dict(tensor_parallel_size=cfg.sampling.tensor_parallel_size,
                gpu_memory_utilization=cfg.sampling.gpu_memory_utilization, dtype=where.dtype,
                engine_options=dict(cfg.sampling.vllm_options))


class VLLMBackend:
    """``sampling.backend: vllm`` (registered in ``sampling/backends.py``)."""

    def make(self, model: Any, tokenizer: Any = None, **options: Any) -> Sampler:
        if not isinstance(model, (str, Path)):
            raise ItermergeError(
                f"sampling backend 'vllm' needs a checkpoint path, got a {type(model).__name__}; "
                "pass the model directory (vLLM loads it itself)"
            )
        return VLLMSampler(str(model), **options)

    @contextlib.contextmanager
    def stage(self, cfg: RunConfig, policy_path: str | Path, tokenizer: Any, where: Placement) -> Iterator[Sampler]:
        with VLLMSampler(str(policy_path), **engine_settings(cfg, where)) as sampler:
            yield sampler

    @contextlib.contextmanager
    def evaluation(self, cfg: RunConfig, where: Placement, theta_T: str | Path) -> Iterator[Callable[..., Sampler]]:
        """One engine for the stage, started from θT when first asked for (a rank with no items starts none), into
        which each evaluated model's weights are loaded (the search's merges never go to disk as checkpoints)."""
        engine: list[VLLMSampler] = []

        def make_sampler(model: Any, tokenizer: Any, batch_size: int, progress: bool) -> VLLMSampler:
            if not engine:
                engine.append(VLLMSampler(str(theta_T), reloadable=True, **engine_settings(cfg, where)))
            engine[0].update_weights(model.state_dict())
            return engine[0]

        try:
            yield make_sampler
        finally:
            if engine:
                engine[0].close()


BACKEND = VLLMBackend()


# ---------------------------------------------------------------- the engine's process


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, ItermergeError) else f"{type(err).__name__}: {err}"


def serve(conn: Connection) -> None:
    """The engine's process: build the engine from the options sent, then answer calls until close or EOF."""
    from itermerge.sampling.vllm import VLLMEngine

    options = conn.recv()
    try:
        engine = VLLMEngine(**options)
    except Exception as err:
        traceback.print_exc()
        conn.send(("error", _describe(err)))
        return
    conn.send(("ok", engine.eos_ids))
    while True:
        try:
            method, args = conn.recv()
        except EOFError:  # the run's process is gone
            return
        if method == "close":
            engine.close()
            conn.send(("ok", None))
            return
        try:
            if method == "update_weights":
                from safetensors.torch import load_file

                value = engine.update_weights(load_file(args[0]))
            else:
                value = engine.generate(*args)
        except Exception as err:
            traceback.print_exc()
            conn.send(("error", _describe(err)))
            continue
        conn.send(("ok", value))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # vLLM's exit handlers have nothing to keep; what the engine took goes back with the process
