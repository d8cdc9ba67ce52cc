"""wan: a from-scratch torch port of the Wan2.2 text-to-video package (the distillation teacher).

Public layout mirrors upstream so user scripts import the same names:
`wan.configs`, `wan.modules`, `wan.utils`, `wan.text2video.WanT2V`.
Submodules are imported lazily so `import wan` stays cheap.
"""

__all__ = ["WanT2V"]


def __getattr__(name):
    if name == "WanT2V":
        from .text2video import WanT2V

        return WanT2V
    raise AttributeError(f"module 'wan' has no attribute {name!r}")
