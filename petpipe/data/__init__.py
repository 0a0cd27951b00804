"""Photos to tensors: getting them (a folder, an archive, a URL, a list of image URLs), what counts as a photo,
the index (labels, corrections, splits), the presized pixel cache, the dataset and the views the network sees
(augmentation, evaluation crop)."""
