"""What keeps the machine fast and the run safe, independent of the method.

`conv` (the CPU convolution and its compiler options), `host_memory` (glibc malloc on
CPU hosts), `workdir_lock` (one writer per workdir). Imports nothing from qnet.
"""
