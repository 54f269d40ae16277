"""`wss tune`'s science: settings downstream of the trained networks, searched on the cached
artifacts. `stage2` sweeps the CAM background threshold and the walk's settings on the masks of
the tuning split; `empty_masks` searches the binary empty-mask rule on the image labels of the
part of train held out from the segmenter's training (and on the tuning split's masks)."""
