//! Media types, picture dimensions and thumbnails of files this node sends, and the bounded check of thumbnails it receives.
