"""Deployment targets `unimp plan` budgets against: memory, GPU, accelerators and the software stack.

Facts come from NVIDIA's published module specifications and JetPack / TensorRT release notes as collected
in the project's TensorRT research notes; each entry says where a value comes from, and values that could
not be confirmed are marked "unverified" (in ``notes`` and in the comments). Nothing here was measured on
the hardware. ``reserved_bytes`` (the OS / desktop / compositor share) is an estimate for a kiosk image,
not a measurement: override it with ``unimp plan --reserve-gb``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 10**9
GIB = 2**30


@dataclass(frozen=True)
class SoftwareStack:
    """One supported OS image for a board (a JetPack release, or a desktop driver stack)."""

    name: str
    tensorrt: str
    cuda: str
    python: str
    note: str = ""


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    total_memory: int
    """Bytes of memory the GPU can use: the whole LPDDR5 pool on Jetson (unified), the VRAM on a discrete GPU."""
    unified_memory: bool
    """CPU and GPU share one memory (Jetson): the OS, the Python process and every engine draw on ``total_memory``."""
    gpu_arch: str
    compute_capability: tuple[int, int] | None
    """None where the board name does not pin one GPU (the x86 entry: any card with that much memory)."""
    dla_cores: int
    reserved_bytes: int
    """OS / desktop / CUDA context share kept out of the budget (an estimate, see the module docstring)."""
    stacks: tuple[SoftwareStack, ...]
    host_memory: int = 0
    """Discrete GPUs: the host RAM assumed beside the card (0 on unified-memory boards)."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def budget_bytes(self) -> int:
        """What the model may use: total memory minus the reserved share."""
        return max(0, self.total_memory - self.reserved_bytes)


# JetPack 6.1 / 6.2 (Jetson Linux 36.x, Ubuntu 22.04): CUDA 12.6, TensorRT 10.3, cuDNN 9.3, Python 3.10
#   [docs.pytorch.org/TensorRT getting_started/jetpack; TensorRT 11.4.1 Jetson migration page: "Jetson Orin on
#   JetPack 6.x ... must remain on a TensorRT 10.x release"].
_JP6 = SoftwareStack(
    "JetPack 6.2", tensorrt="10.3", cuda="12.6", python="3.10",
    note="the runtime runs on its Python 3.10; export artifacts on a Python 3.11 machine (docs/jetson.md)",
)
# JetPack 7.2 adds Orin with CUDA 13.2 and Python 3.12 [Seeed guide; TensorRT Edge-LLM 0.8.0 overview]; TRT 11.4.1
# supports JetPack 7.2.2+ on AGX Orin and Thor [TRT 11.4.1 release notes]. The TensorRT version JetPack 7.2
# bundles is unverified, and so is TRT 11 on Orin Nano / NX (the release notes name AGX Orin only).
_JP7_AGX = SoftwareStack("JetPack 7.2", tensorrt="11.x (unverified)", cuda="13.2", python="3.12")
_JP7_SMALL = SoftwareStack(
    "JetPack 7.2", tensorrt="10.x/11.x (unverified)", cuda="13.2", python="3.12",
    note="TensorRT 11 support on Orin Nano / NX is unverified: the 11.4.1 notes name AGX Orin only",
)
_X86 = SoftwareStack(
    "x86_64 + NVIDIA driver", tensorrt="10.x or 11.x", cuda="12.x or 13.x", python="3.10+",
    note="onnxruntime-gpu from PyPI (CUDA 12 wheels); TensorRT from PyPI or NVIDIA's repositories",
)

# Jetson Orin modules: Ampere iGPU (GA10B), compute capability 8.7 [CUDA GPUs table, developer.nvidia.com];
# memory sizes from the module names (LPDDR5, shared by CPU, GPU and DLA); DLA counts from the Jetson Orin
# datasheets: AGX Orin and Orin NX 2, Orin Nano none (datasheet fact, unverified here).
# OS share: the research notes' estimate of 1.5-2 GB for the OS and a kiosk UI (unverified), 1.0 GB on a
# headless Nano image (unverified).
def _orin(name: str, description: str, *, memory_gb: int, cuda_cores: int, dla_cores: int, reserved_bytes: int,
          stacks: tuple[SoftwareStack, ...], notes: tuple[str, ...] = ()) -> Board:
    """A Jetson Orin module: GA10B iGPU (cc 8.7) on unified memory; ``notes`` default to the shared-memory one."""
    return Board(
        name=name,
        description=description,
        total_memory=memory_gb * GB,
        unified_memory=True,
        gpu_arch=f"Ampere (GA10B iGPU, {cuda_cores} CUDA cores)",
        compute_capability=(8, 7),
        dla_cores=dla_cores,
        reserved_bytes=reserved_bytes,
        stacks=stacks,
        notes=notes or (f"unified memory: the OS and the Python process draw on the same {memory_gb} GB",),
    )


BOARDS: dict[str, Board] = {
    b.name: b
    for b in (
        _orin(
            "orin-nano-8gb", "Jetson Orin Nano 8 GB (developer kit / module)",
            memory_gb=8, cuda_cores=1024, dla_cores=0, reserved_bytes=int(1.5 * GB), stacks=(_JP6, _JP7_SMALL),
            notes=(
                "unified memory: the OS, the Python process, the engines and TensorRT's build scratch share 8 GB",
                "building a large engine can run out of memory (TACTIC_DRAM defaults to 75% of memory): build one "
                "graph per process with a lower workspace (unimp build-engines --workspace-gb)",
            ),
        ),
        _orin("orin-nx-16gb", "Jetson Orin NX 16 GB", memory_gb=16, cuda_cores=1024, dla_cores=2,
              reserved_bytes=int(1.5 * GB), stacks=(_JP6, _JP7_SMALL)),
        _orin("agx-orin-64gb", "Jetson AGX Orin 64 GB", memory_gb=64, cuda_cores=2048, dla_cores=2,
              reserved_bytes=2 * GB, stacks=(_JP6, _JP7_AGX)),
        Board(
            name="x86-16gb",
            description="x86_64 host with a 16 GB discrete NVIDIA GPU (e.g. T4, RTX A4000; any card of that size)",
            total_memory=16 * GB,
            unified_memory=False,
            gpu_arch="any NVIDIA GPU supported by the installed TensorRT (Turing or newer)",
            compute_capability=None,
            dla_cores=0,
            # the CUDA context and cuDNN/cuBLAS workspaces (a few hundred MB; unverified) and a display, if any
            reserved_bytes=int(0.75 * GB),
            host_memory=32 * GB,
            stacks=(_X86,),
            notes=(
                "discrete GPU: the budget is the card's memory; the Python process and the catalog stores live in "
                "host RAM (assumed 32 GB)",
            ),
        ),
        Board(
            name="datacenter-80gb",
            description="datacenter GPU with 80 GB (A100 80GB: cc 8.0, H100 80GB: cc 9.0)",
            total_memory=80 * GB,
            unified_memory=False,
            gpu_arch="Ampere or Hopper",
            compute_capability=None,
            dla_cores=0,
            reserved_bytes=1 * GB,
            host_memory=256 * GB,
            stacks=(_X86,),
            notes=("discrete GPU: the Python process and the catalog stores live in host RAM (assumed 256 GB)",),
        ),
    )
}


def get_board(name: str) -> Board:
    """The board called ``name``; ValueError listing the known names otherwise."""
    try:
        return BOARDS[name]
    except KeyError:
        raise ValueError(f"--board: unknown board {name!r} (known: {', '.join(BOARDS)})") from None
