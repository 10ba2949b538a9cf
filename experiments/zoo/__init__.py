"""The embedded model zoo: a target/draft pair trained on the standard library and cached.

``ensure_pair(size)`` returns the paths of a verified pair, building it on first use::

    from experiments.zoo import ensure_pair
    pair = ensure_pair("micro")
    model = AutoModelForCausalLM.from_pretrained(pair.target_dir)
"""

from experiments.zoo.build import ZooError, ZooPair, ensure_pair
from experiments.zoo.cache import CacheEntryError
from experiments.zoo.sizes import SIZES, ZooSize, get_size

__all__ = ["SIZES", "CacheEntryError", "ZooError", "ZooPair", "ZooSize", "ensure_pair", "get_size"]
