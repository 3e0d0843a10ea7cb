"""CI guard: the environment must not contain torchvision (it breaks diffusers here, see PLATFORM.md)."""

import importlib.util
import sys

if importlib.util.find_spec("torchvision") is not None:
    sys.exit("torchvision is installed in this environment; framer_dist must not depend on it "
             "(it breaks `import diffusers` model classes next to torch 2.13). Remove it: "
             "pip uninstall -y torchvision")
print("env ok: torchvision absent")
