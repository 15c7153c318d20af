"""`edgeforge toolchains install NAME`: what a target needs to build or run here, from the installed
package (no checkout needed): arm64 (cross compiler, qemu, an arm64 root with the runtime wheels),
vulkan (Mesa lavapipe + the onnxruntime-webgpu venv), web (Debian's chromium + the pinned npm
packages a web bundle ships), cuda (nvcc 13) / cuda12 (NVRTC 12.6), from PyPI wheels."""

from __future__ import annotations

import click


@click.group()
def toolchains():
    """Install the toolchains targets need (idempotent, cached under ~/.cache/edgeforge/toolchains).

    \b
    Example:
      edgeforge toolchains install cuda      # nvcc 13 from PyPI: build `cuda` bundles without a GPU
      edgeforge toolchains install cuda12    # NVRTC 12.6 for jetson-orin (JetPack 6)
      edgeforge toolchains install arm64     # aarch64 g++, qemu and an arm64 root: rpi5 smoke --emulate
      edgeforge toolchains install vulkan    # Mesa lavapipe + onnxruntime-webgpu: vulkan smoke here
      edgeforge toolchains install web       # Debian's chromium + pinned onnxruntime-web (npm): web bundles
    """


@toolchains.command()
@click.argument("name", type=click.Choice(["arm64", "vulkan", "web", "cuda", "cuda13", "cuda12"]))
def install(name):
    """Install one toolchain (a no-op when it is there). Example: edgeforge toolchains install cuda"""
    from ..toolchains import install as do_install

    where = do_install(name)
    click.echo(f"{name}: ready ({where})")
