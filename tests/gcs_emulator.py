"""The local GCS server of the gs:// tests: gcp-storage-emulator, with each download's object generation.

The emulator sends no x-goog-generation header with a download. tensorstore then stamps what it read
with generation 0 and refuses the conditional write that follows ("Malformed StorageGeneration"). OCDBT
reads its manifest back when its cache has gone stale, so an orbax save on the emulator failed only
sometimes, on a slow or busy machine. Real GCS sends the header.
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])


objects.download = download  # before the server's route table takes its handlers

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    sys.exit(main(sys.argv[1:]))
