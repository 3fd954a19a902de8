"""Self-supervised pretraining: SiMo with the EqCo loss, and the baselines it is compared with."""

import logging
import warnings

# Import-time noise of the dependencies on every CLI start, nothing the user can act on:
# detectron2 still calls torch.jit.script (deprecated in torch >= 2.10), and importing
# torch.utils.cpp_extension on a machine without CUDA logs "No CUDA runtime is found".
warnings.filterwarnings(
    "ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning
)
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
