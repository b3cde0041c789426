"""quant: QALoRA low-bit quantization and deployment (in progress, issue 8).

Nothing is exported yet: quantization lands with its issue. This package exists so that the
distribution's top-level layout (fastgen, samplers, distill, quant, apps) is fixed from the start.
"""
