"""The experiments of tools/sweep.py (the K-sweep: ``ksweep_*``) and tools/mi_toy.py (the toy
mutual-information estimate: ``mi_toy*``), written on the public functions of the installed
``pretrain`` package. Not installed with it: the two tools import it from beside them."""
