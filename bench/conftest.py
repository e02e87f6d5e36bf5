import os
import sys

# `python -m pytest bench/...` from the repository root: make `import bench` resolve.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
