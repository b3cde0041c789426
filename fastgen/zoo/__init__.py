"""Embedded default models of fastgen and the procedural worlds they are trained and scored on.

``fastgen.zoo.shapes`` is a procedural text-to-image world (coloured shapes, counts, relations) and
``fastgen.zoo.evaluate`` its exact, rule-based evaluator.
"""
