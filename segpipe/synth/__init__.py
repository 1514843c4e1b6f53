"""Procedural top-down construction-site scenes: the embedded default dataset.

Pure functions only: ``classes`` (the class table), ``scene`` (random layout of stuff regions
and things), ``render`` (label maps and the photo), ``coco`` (visible masks to COCO
segmentations). ``segpipe.stages.synth`` does the I/O.
"""
