"""An in-process stand-in for Google Cloud Storage: ``gs://bucket/key`` lives under a local root.

It replaces only the transport. epath (and so orbax's directory handling and our own writes)
goes through a registered fsspec ``gs`` filesystem, and orbax's TensorStore specs are pointed at
the same root, so the code under test takes its real ``gs://`` paths: no pathlib on URIs,
whole-object writes, no appends, orbax's commit marker instead of a rename.
"""
import contextlib
import os
import sys

import fsspec
from fsspec.implementations.local import LocalFileSystem


@contextlib.contextmanager
def fake_gcs(root):
  """Within the block, ``gs://b/k`` is the file ``root/b/k``."""
  root = os.path.abspath(root)

  def local(path: str) -> str:
    rest = path[len('gs://'):]
    # Listings return local paths, which epath prefixes with gs:// again: map those back.
    if ('/' + rest).startswith(root + '/'):
      return '/' + rest
    return os.path.join(root, rest)

  class FakeGCS(LocalFileSystem):
    protocol = ('gs', 'gcs')

    @classmethod
    def _strip_protocol(cls, path):
      path = str(path)
      return LocalFileSystem._strip_protocol(local(path) if path.startswith('gs://') else path)

    def __init__(self, *args, **kwargs):
      kwargs.pop('finalize_on_close', None)  # a gcsfs option
      kwargs['auto_mkdir'] = True  # a bucket has no directories to create first
      super().__init__(*args, **kwargs)

  from etils.epath import backend
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  registry = sys.modules['fsspec.registry']._registry  # `fsspec.registry` is a read-only view
  saved = (registry.get('gs'), registry.get('gcs'), ts_utils._normalize_path,
           gcs_utils.is_hierarchical_namespace_enabled)
  normalize = ts_utils._normalize_path
  for proto in ('gs', 'gcs'):
    fsspec.register_implementation(proto, FakeGCS, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()  # epath keeps one instance per scheme
  ts_utils._normalize_path = lambda p: normalize(local(p) if p.startswith('gs://') else p)
  gcs_utils.is_hierarchical_namespace_enabled = lambda p: False  # would ask the GCS API
  try:
    yield root
  finally:
    for proto, cls in zip(('gs', 'gcs'), saved[:2]):
      registry.pop(proto, None)
      if cls is not None:
        registry[proto] = cls
    ts_utils._normalize_path, gcs_utils.is_hierarchical_namespace_enabled = saved[2:]
    FakeGCS.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()
