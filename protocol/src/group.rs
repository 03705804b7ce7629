//! The MLS group engine.
