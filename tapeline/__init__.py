"""tapeline: the tf.GradientTape example as a production batch pipeline, with every gradient kept.

Importing it sets the process's environment defaults, once for every entry point (the CLI,
the flows, the tests): TensorFlow's C++ start-up chatter off. A value already set wins.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
