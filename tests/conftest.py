import matplotlib
import torch

matplotlib.use("Agg")
# The tests' tensors are small: one thread is as fast, deterministic, and does not oversubscribe
# the cores when a test starts worker or DDP processes of its own.
torch.set_num_threads(1)
