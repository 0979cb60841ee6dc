import os
import sys

# Tests import the top-level modules (train, data, ...) from the project root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
