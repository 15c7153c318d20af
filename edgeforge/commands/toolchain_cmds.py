"""`edgeforge toolchains install NAME`: what a target needs to build or run here, from the installed
package (no checkout needed): arm64 (cross compiler, qemu, an arm64 root with the runtime wheels),
vulkan (Mesa lavapipe + the onnxruntime-webgpu venv), cuda (nvcc 13) / cuda12 (NVRTC 12.6), from PyPI wheels."""

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
    """


@toolchains.command()
@click.argument("name", type=click.Choice(["arm64", "vulkan", "cuda", "cuda13", "cuda12"]))
def install(name):
    """Install one toolchain (a no-op when it is there). Example: edgeforge toolchains install cuda"""
    from ..toolchains import install as do_install

    where = do_install(name)
    click.echo(f"{name}: ready ({where})")
