"""Sources: the psutil poller, the py-spy sampler and the UDP listener. All I/O lives here."""
