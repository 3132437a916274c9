"""Every input limit of the package, defined once.

The app, the command-line tools and the Python API all read these values, so a limit
changed here changes everywhere. README.md ("Limits and safety") lists them for users.
"""

from __future__ import annotations

#: Fewest and most normal images one ``fit`` accepts (the papers use 1 to 8 shots).
MIN_NORMAL_IMAGES = 1
MAX_NORMAL_IMAGES = 8

#: Largest decoded image, in pixels (width * height). Larger files are refused before
#: decoding, which also stops decompression bombs (a small PNG claiming 30000 x 30000).
MAX_IMAGE_PIXELS = 40_000_000

#: Smallest accepted side of an image, in pixels. A smaller image holds less than one
#: ViT patch of detail and is refused with a clear message.
MIN_IMAGE_SIDE = 8

#: Largest accepted side ratio (long side / short side). Extremely thin strips would be
#: resized to enormous frames by shorter-side resizing (InCTRL) and carry no usable view.
MAX_ASPECT_RATIO = 200.0

#: Largest uploaded file accepted by the app, in bytes (Gradio's ``max_file_size``).
MAX_UPLOAD_BYTES = 10 * 1024 * 1024

#: Queries one batch request of the app may hold.
MAX_BATCH_QUERIES = 64

#: App queue: jobs that run at once, and jobs that may wait before "queue full".
MAX_CONCURRENT_JOBS = 1
MAX_QUEUED_JOBS = 16

#: Seconds one app request may run before it is stopped.
REQUEST_TIMEOUT_SECONDS = 600

#: Sessions whose state (the last report: query pixels and maps) the app keeps in memory;
#: the least recently used session's state is dropped first (Gradio's
#: ``state_session_capacity``; Gradio's own default is 10000).
MAX_STORED_SESSIONS = 64

#: Fitted detectors the app keeps (least recently used ones are dropped first); large enough
#: that fits prefetched for a few sessions are not dropped before their Run.
FITTED_DETECTOR_CACHE_SIZE = 24

#: Background jobs (prefetch, warm start) that run at once; they always yield to a
#: request's own work (``detector.scheduler``).
MAX_BACKGROUND_JOBS = 1

#: Slot grants the scheduler remembers for diagnostics (the oldest are forgotten first).
SCHEDULER_GRANTS_KEPT = 1000

#: Distinct backbones kept in memory per process.
BACKBONE_CACHE_SIZE = 4

#: Decoded pixels of uploaded files the app keeps, in bytes (``detector.image_cache``): a
#: Run after the upload's background work, or a second query against the same normals,
#: reads the normals without decoding them again.
DECODED_IMAGE_CACHE_BYTES = 256 * 1024 * 1024
