"""Reading and writing other libraries' adapter formats (HF ``peft``: :mod:`peftlab.interop.peft`)."""

from peftlab.interop.peft import export_peft, import_peft

__all__ = ["export_peft", "import_peft"]
