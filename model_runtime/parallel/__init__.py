"""One rank per device: the rank launcher, the process group of a rank, and the modules that make a rank's
shard of the model (tensor-parallel attention, embedding and head; expert- or tensor-parallel MoE). gloo on CPU,
NCCL on NVIDIA, HCCL on Ascend (`group.backend_for`). The loader is `dsv4.model_runtime.weights.load_rank`.

Nothing is imported here, so that importing a submodule (the launcher's parent process) costs no torch import.
"""
