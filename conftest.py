"""Collection of the package's doctests: `segvec/distributed.py` imports ray, an optional dependency."""
import importlib.util

collect_ignore = [] if importlib.util.find_spec("ray") else ["segvec/distributed.py"]
