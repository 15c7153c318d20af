"""List Vulkan physical devices with ctypes only; prints JSON {"devices": [...], "error": ...}.

Run as a script in a child process (`python vulkan_probe.py`): a broken driver may crash, and the
environment (VK_DRIVER_FILES, LD_LIBRARY_PATH) chooses which loader and drivers are seen. It needs no
package besides the standard library, so any Python (a separate venv too) can run it.
"""

from __future__ import annotations

import ctypes
import json
import sys

DEVICE_TYPES = {0: "other", 1: "integrated-gpu", 2: "discrete-gpu", 3: "virtual-gpu", 4: "cpu"}


class _AppInfo(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_int32),  # VK_STRUCTURE_TYPE_APPLICATION_INFO = 0
        ("pNext", ctypes.c_void_p),
        ("pApplicationName", ctypes.c_char_p),
        ("applicationVersion", ctypes.c_uint32),
        ("pEngineName", ctypes.c_char_p),
        ("engineVersion", ctypes.c_uint32),
        ("apiVersion", ctypes.c_uint32),
    ]


class _InstanceInfo(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_int32),  # VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO = 1
        ("pNext", ctypes.c_void_p),
        ("flags", ctypes.c_uint32),
        ("pApplicationInfo", ctypes.POINTER(_AppInfo)),
        ("enabledLayerCount", ctypes.c_uint32),
        ("ppEnabledLayerNames", ctypes.c_void_p),
        ("enabledExtensionCount", ctypes.c_uint32),
        ("ppEnabledExtensionNames", ctypes.c_void_p),
    ]


def _version(v: int) -> str:
    return f"{(v >> 22) & 0x7F}.{(v >> 12) & 0x3FF}.{v & 0xFFF}"


def list_devices() -> list[dict]:
    vk = ctypes.CDLL("libvulkan.so.1")
    app = _AppInfo(0, None, b"edgeforge-probe", 1, b"edgeforge", 1, (1 << 22) | (1 << 12))
    info = _InstanceInfo(1, None, 0, ctypes.pointer(app), 0, None, 0, None)
    instance = ctypes.c_void_p()
    result = vk.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(instance))
    if result != 0:
        raise RuntimeError(f"vkCreateInstance returned {result}")
    try:
        count = ctypes.c_uint32(0)
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), None)
        handles = (ctypes.c_void_p * count.value)()
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), handles)
        return [_properties(vk, h) for h in handles[: count.value]]
    finally:
        vk.vkDestroyInstance(instance, None)


def _properties(vk, handle) -> dict:
    # VkPhysicalDeviceProperties: five uint32 (api, driver, vendor, device, type), then
    # char deviceName[256], then large limit structs we do not read (a generous buffer holds them).
    buf = ctypes.create_string_buffer(4096)
    vk.vkGetPhysicalDeviceProperties(ctypes.c_void_p(handle), buf)
    api, driver, vendor, device, kind = (int.from_bytes(buf.raw[i : i + 4], "little") for i in range(0, 20, 4))
    name = buf.raw[20:276].split(b"\0", 1)[0].decode(errors="replace")
    return {
        "name": name,
        "type": DEVICE_TYPES.get(kind, str(kind)),
        "api_version": _version(api),
        "vendor_id": f"0x{vendor:04x}",
        "device_id": f"0x{device:04x}",
    }


def main() -> int:
    try:
        print(json.dumps({"devices": list_devices()}))
    except (OSError, RuntimeError, AttributeError) as err:
        print(json.dumps({"devices": [], "error": str(err)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
