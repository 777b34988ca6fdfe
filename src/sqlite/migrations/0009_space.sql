-- Bytes running steps hold on a file system (its mount point) for the output they are about to
-- write; a row lapses at expires_at (milliseconds) unless its holder takes it again.
CREATE TABLE space_reservations (
    fs TEXT NOT NULL,
    holder TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (fs, holder)
);
