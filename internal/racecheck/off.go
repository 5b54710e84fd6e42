//go:build !race

// Package racecheck tells tests whether the race detector is compiled in.
package racecheck

// Enabled reports whether the race detector is on: it allocates on its own,
// so allocation counts are only asserted without it.
const Enabled = false
