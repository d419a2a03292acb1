"""Small helpers every stage shares: user errors, atomic files, seeds, checksums, process groups and FSDP2, saved-bytes
counting, the conditioning types, quieting a dependency's import notices."""
