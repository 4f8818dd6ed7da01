"""Multi-process orchestration above the core: scoring after FSDP2 sharding, when training
starts (`sharded_scoring`).

Floor 5: may import floors 1-4; never `integration` or Axolotl. (Low-level rank and slice helpers
live in `base`, so every room can use them.)
"""
