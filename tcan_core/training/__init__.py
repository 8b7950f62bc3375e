"""TCAN training on the user's videos: ``data`` (clip sets and the two stages' datasets), ``prepare``
(prepare-data), ``step`` (one batch's loss through the sampler's window forward), ``trainer`` (both stages,
accelerate), ``checkpoint`` (training state), ``outputs`` (weight files and validation sheets), ``command``
(the ``train`` command)."""
