"""OrderedHash: the whole-file checksum from regions fed out of order by several threads (gaps read
by the hash itself, volatile buffers copied) equals the manifest's checksum of the file."""

from __future__ import annotations

import os
import random
import threading

from skyrl_callbacks.manifest import checksum_algo, hash_file
from skyrl_callbacks.storage import Storage
from skyrl_callbacks.verify import OrderedHash


def test_out_of_order_volatile_feeds_give_the_file_checksum(tmp_path):
    rng = random.Random(7)
    data = os.urandom(3 << 20)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    _size, want = hash_file(Storage(str(tmp_path)), str(path), checksum_algo())
    # regions with gaps between them (headers), the first one not at 0, a tail after the last
    regions, pos = [], 100
    while pos < len(data) - 5000:
        n = rng.randint(1, 200_000)
        regions.append((pos, min(n, len(data) - 5000 - pos)))
        pos += n + rng.randint(0, 300)
    for trial in range(3):
        fd = os.open(path, os.O_RDONLY)
        try:
            h = OrderedHash(fd, len(data), checksum_algo(), regions)
            order = regions[:]
            rng.shuffle(order)
            chunks = [order[i::4] for i in range(4)]

            def feed(mine):
                for off, n in mine:
                    buf = bytearray(data[off:off + n])  # a reader's buffer, refilled after feed
                    h.feed(off, buf, volatile=True)
                    buf[:] = b"\0" * n

            threads = [threading.Thread(target=feed, args=(c,)) for c in chunks]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert h.hexdigest() == want, trial
        finally:
            os.close(fd)
    # a region never fed: no checksum (the file is then hashed after the load)
    fd = os.open(path, os.O_RDONLY)
    try:
        h = OrderedHash(fd, len(data), checksum_algo(), regions)
        for off, n in regions[1:]:
            h.feed(off, data[off:off + n])
        assert h.hexdigest() is None
    finally:
        os.close(fd)
