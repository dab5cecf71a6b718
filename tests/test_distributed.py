"""Devices, precision and collectives with CUDA mocked: what a GPU or multi-GPU run would do, checked on a CPU.

The real multi-process paths (gloo through torchrun) are in test_train_ddp.py."""

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from whisfusion_cli import distributed as D
from whisfusion_cli import train as T
from whisfusion_cli.devices import resolve_device

PACKAGE = Path(D.__file__).parent


@pytest.fixture
def gpus(monkeypatch):
    """A node with GPUs as torch would report them: capability per index; set_device needs an index, as
    torch.cuda.set_device(torch.device("cuda")) fails on a real GPU."""
    capability = {0: (7, 5), 1: (8, 0), 2: (9, 0), 3: (9, 0)}  # a T4, an A100, two H100s
    current = []

    def set_device(device):
        device = torch.device(device)
        if device.index is None:
            raise ValueError("Expected a cuda device with a specified index or an integer, but got:cuda")
        current.append(device.index)

    def get_capability(device=None):
        index = torch.device(device).index if device is not None else (current[-1] if current else 0)
        return capability[index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capability))
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation: not asked
    return current


def test_each_rank_takes_its_local_gpu(gpus, monkeypatch):
    node = D.Ranks(rank=6, world=8, local_rank=2, local_world=4)
    for option in (None, "auto", "cuda", "CUDA"):
        assert D.rank_device(option, node) == torch.device("cuda", 2)
    assert D.rank_device("cpu", node) == torch.device("cpu")
    with pytest.raises(ValueError, match="would put every rank on one GPU"):
        D.rank_device("cuda:0", node)  # every rank would get GPU 0
    alone = D.Ranks()
    assert D.rank_device("cuda:1", alone) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 4 GPU"):
        D.rank_device("cuda:7", alone)
    with pytest.raises(ValueError, match="only 4 GPU"):
        D.rank_device("cuda", D.Ranks(rank=5, world=6, local_rank=5, local_world=6))
    with pytest.raises(ValueError, match="unknown device"):
        D.rank_device("tpu", alone)
    # The launcher's environment, as torchrun sets it; `--device cuda` makes cuda:LOCAL_RANK current.
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    group = D.Group.start("cuda")
    assert group.device == torch.device("cuda", 3) and gpus == [3] and group.world == 1


def test_no_gpu_is_one_line():
    if torch.cuda.is_available():  # the rule under test is the CPU-only machine's; on a GPU it maps instead
        assert D.rank_device("cuda", D.Ranks()).index == 0
        return
    with pytest.raises(ValueError, match="no CUDA GPU"):
        D.rank_device("cuda", D.Ranks())


def test_training_and_preprocessing_use_the_rank_device(gpus, monkeypatch, tmp_path):
    from whisfusion_cli import data, encoder

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    seen = []

    class Stop(Exception):
        pass

    def fake_load_encoder(spec, device="cpu", dtype=None):
        seen.append(torch.device(device))
        raise Stop

    monkeypatch.setattr(encoder, "load_encoder", fake_load_encoder)
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(Stop):
        data.preprocess(data.PreprocessOptions(input=str(tmp_path), output=str(tmp_path / "out"), device="cuda",
                                               progress=False))
    assert seen == [torch.device("cuda", 1)] and gpus == [1]
    # Training resolves its device the same way, before it reads any data.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(T.TrainError, match="would put every rank on one GPU"):
        T.train(T.TrainOptions(data=str(tmp_path / "none"), output=str(tmp_path / "run"), device="cuda:0"))


def test_no_cuda_rng_state_is_saved_or_restored(gpus, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("touches every GPU's generator")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", boom)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", boom)
    state = T._rng_state()
    assert set(state) == {"torch", "python", "numpy"}
    before = torch.rand(3)
    T._set_rng_state({**state, "cuda": [torch.zeros(8, dtype=torch.uint8)] * 4})  # an older checkpoint's entry
    assert torch.equal(torch.rand(3), before)  # the CPU generator is restored exactly


def test_precision_follows_the_chosen_gpu(gpus, monkeypatch):
    t4, a100 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert not D.native_bf16(t4) and D.native_bf16(a100) and not D.native_bf16(torch.device("cpu"))
    assert D.half_dtype(t4) == torch.float16 and D.half_dtype(a100) == torch.bfloat16
    # Training: auto is fp16 (with loss scaling) on the T4, bf16 on the A100, fp32 on the CPU.
    assert T.autocast_dtype("auto", t4) == torch.float16 and T.autocast_dtype("auto", a100) == torch.bfloat16
    assert T.autocast_dtype("auto", torch.device("cpu")) is None and T.autocast_dtype("fp32", a100) is None
    assert T.autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(T.TrainError, match="fp16 needs a GPU"):
        T.autocast_dtype("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision"):
        T.TrainOptions(data="x", output="y", precision="fp8")
    # Transcription: the chosen GPU's capability, whichever device is current.
    gpus.append(1)  # the A100 is current, the T4 is asked for
    assert resolve_device("cuda:0", "auto") == (t4, torch.float16)
    assert resolve_device("cuda:1", "auto") == (a100, torch.bfloat16)
    assert resolve_device("cuda:0", "float32") == (t4, torch.float32)
    # TF32 only where tensor cores have it.
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert not D.enable_tf32(t4) and torch.backends.cuda.matmul.allow_tf32 == flags[0]
        assert D.enable_tf32(a100) and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


class Recorded(Exception):
    pass


@pytest.fixture
def recording(monkeypatch):
    """A process group that records every collective and checks its tensors are on the device the backend
    takes them from: the rank's GPU under NCCL. The meta device stands in for that GPU (no data, so the
    collective stops after recording)."""
    calls = []

    def all_reduce(tensor, *a, **k):
        calls.append(("all_reduce", tensor.device))
        raise Recorded

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return calls


def test_collectives_put_their_tensors_on_the_rank_gpu(recording):
    gpu = torch.device("meta")  # a device that is not the CPU, like cuda:N
    group = D.Group(D.Ranks(rank=1, world=2, local_rank=1, local_world=2), gpu, backend="nccl")
    assert group.collective_device == gpu
    with pytest.raises(Recorded):
        group.sum(torch.zeros((), dtype=torch.float64))  # the step loss, as the training loop passes it
    with pytest.raises(Recorded):
        group.any(True)  # the time-limit flag, made on the CPU by the caller
    assert recording == [("all_reduce", gpu), ("all_reduce", gpu)]
    cpu_group = D.Group(D.Ranks(rank=1, world=2), torch.device("cpu"), backend="gloo")
    assert cpu_group.collective_device == torch.device("cpu")  # gloo reduces CPU tensors only
    with pytest.raises(Recorded):
        cpu_group.any(False)
    assert recording[-1] == ("all_reduce", torch.device("cpu"))


def test_only_the_distributed_module_calls_collectives():
    """Collectives go through Group, which places their tensors; a direct call elsewhere is how a CPU
    tensor reached NCCL."""
    pattern = re.compile(r"\bdist\.(all_reduce|broadcast\w*|all_gather\w*|barrier|init_process_group|reduce\w*)\(")
    offenders = [p.name for p in PACKAGE.glob("*.py") if p.name != "distributed.py" and pattern.search(p.read_text())]
    assert offenders == []


def test_one_process_group_needs_no_backend():
    group = D.Group(D.Ranks(), torch.device("cpu"))
    assert float(group.sum(torch.tensor(2.5))) == 2.5 and group.any(True) and not group.any(False)
    assert group.broadcast({"a": 1}) == {"a": 1} and group.gather(3) == [3]
    assert group.on_main(lambda: 7) == 7
    module = torch.nn.Linear(2, 2)
    assert group.data_parallel(module) is module  # DDP only with several ranks (test_train_ddp runs two)
    with pytest.raises(KeyError):
        group.on_main(lambda: {}["missing"])  # one process: the error itself
    group.check(None)
    with pytest.raises(T.TrainError, match="^disk full$"):
        group.check("disk full", T.TrainError)
    group.barrier()
    group.close()


def test_out_of_memory_splits_the_batch_in_halves():
    sizes = []

    def run(items):
        sizes.append(len(items))
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in items]

    assert D.in_halves_on_oom(run, list(range(7))) == [x * 10 for x in range(7)]
    assert sizes == [7, 4, 2, 2, 3, 2, 1]
    legacy = RuntimeError("CUDA error: out of memory")
    assert D.is_out_of_memory(legacy) and not D.is_out_of_memory(RuntimeError("shape mismatch"))

    def never_fits(items):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    with pytest.raises(D.DeviceMemoryError, match="^out of device memory on a single window"):
        D.in_halves_on_oom(never_fits, [1, 2], "window")
    with pytest.raises(ValueError):  # other errors pass through untouched, never retried
        D.in_halves_on_oom(lambda items: int("x"), [1, 2])


def test_bench_times_and_measures_the_chosen_gpu(gpus, monkeypatch):
    from whisfusion_cli.bench import memory

    calls = []
    for name in ("synchronize", "reset_peak_memory_stats", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name: calls.append((name, str(device))) or 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    memory.sync("cuda:2")
    meter = memory.MemoryMeter("cuda:2")
    meter.start()
    assert meter.stop()["cuda_max_allocated_mb"] == 0
    assert calls == [("synchronize", "cuda:2"), ("reset_peak_memory_stats", "cuda:2"),
                     ("max_memory_allocated", "cuda:2")]
    memory.sync("cpu")  # nothing to wait for
    assert len(calls) == 3
