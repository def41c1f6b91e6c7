"""pipeline: ptsne's stages on Ray (kNN, affinities, training, embedding) over any pyarrow filesystem."""

import ptsne  # noqa: F401  (first: it names the FAISS build to install when none is)
