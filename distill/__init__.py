"""distill: guidance and consistency distillation trainers (see README "Distillation"; in progress, issue 7).

Nothing is exported yet: the trainers land with their issue. This package exists so that the
distribution's top-level layout (fastgen, samplers, distill, quant, apps) is fixed from the start.
"""
