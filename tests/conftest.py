"""Suite-wide settings.

The tests use small tensors, for which torch's intra-op threads cost more than they save; on the
2-core CI machine two threads made small-tensor ops up to ~100x slower when other work competed for
the cores. One thread keeps the suite's timing predictable. TF32 stays off (the default on CPU).
"""

import torch

torch.set_num_threads(1)
