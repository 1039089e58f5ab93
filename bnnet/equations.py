"""Floor 0: the codes every backend agrees on. Imports nothing of bnnet.

Activation codes: what a fused pass applies after a batch-norm or a Linear (bnnet.ops takes them,
bnnet.kernels and bnnet.cuda_kernels branch on them, bnnet.reference maps them to NumPy functions).
The elementwise equations themselves are written once in bnnet.functional (normalize, running
averages, dx coefficients, ...) and bnnet.optim_rules (the optimizer rules); the scalar activations
and their derivatives, in bnnet.kernels, serve both compiled targets (CPU and CUDA).
"""

IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH = 0, 1, 2, 3, 4
ACTIVATION_CODES = (IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH)
