"""Reading and writing other libraries' adapter formats: HF ``peft`` (:mod:`peftlab.interop.peft`;
each method's mapping is its :class:`peftlab.interop.codec.PeftCodec`)."""
