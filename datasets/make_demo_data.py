"""Write the SYNTHETIC demo data set (the generator is :mod:`bissl_det.data.demo`).

Usage::

    python datasets/make_demo_data.py --out datasets/demo --seed 0
"""

import sys

from bissl_det.data.demo import main

if __name__ == "__main__":
    sys.exit(main())
