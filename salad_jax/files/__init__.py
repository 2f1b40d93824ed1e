"""Writing beside a user's files: whether a path may be written (`destinations`), how a file or
directory is written without touching anything else (`atomic`), and the record of what a run wrote
in an output directory (`outputs`)."""
