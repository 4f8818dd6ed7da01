"""Computing a mask end to end: scores -> budget -> selection -> `FishMask` (`compute`), and
checking that a saved mask fits a model (`provenance`).

Floor 5: may import floors 1-4; never `integration` or Axolotl.
"""
