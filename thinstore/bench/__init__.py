"""Benchmarks for users: ``thinstore bench`` and what ``--compare``/``--report`` add.

- :mod:`.workload` the workload (rbd bench / fio vocabulary);
- :mod:`.threads` the built-in engines (in-process threads, built-in NBD client);
- :mod:`.fio` fio through its nbd engine;
- :mod:`.results` the one result shape every engine ends in;
- :mod:`.target` pool handle, server and the clone a write benchmark runs on;
- :mod:`.session` one benchmark, start to end; :mod:`.compare` interleaved rounds
  against :mod:`.peers` (qemu-nbd, nbdkit);
- :mod:`.report` the HTML/SVG/PNG picture (matplotlib, an optional extra).

Above the storage core and the NBD server: nothing below imports this package.
"""
