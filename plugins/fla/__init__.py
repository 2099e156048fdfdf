"""The optional flash-linear-attention backend (``pip install 'hybridlab[fla]'``): fla's
chunked Triton kernels registered as implementation ``fla`` of our recurrent kinds, one
plugin file per fla family. Without fla installed each plugin loads and registers
nothing. See docs/kernels.md, "The fla backend"."""
