//go:build race

package racecheck

// Enabled reports whether the race detector is on: it allocates on its own,
// so allocation counts are only asserted without it.
const Enabled = true
