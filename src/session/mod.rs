//! Sessions: keys, counters, sealed frames and the session cache (DESIGN §3).
