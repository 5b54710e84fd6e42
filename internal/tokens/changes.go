package tokens

import (
	"time"

	"go.uber.org/zap"
)

// A shared entry is a decision some replica made of a key at some version
// (Key.Version). Redis can hold it past a change of the key: a replica
// that read the store just before the change writes it just after; the
// delete that the change triggers fails during a Redis outage or is lost
// in a failover; whoever can write to Redis puts back a copy saved
// earlier. So a replica adopts a shared entry only if it is not older than
// what the replica knows:
//
//   - the last change of the entry's key it heard of (remembered for as
//     long as an entry written before that change can still be usable:
//     TTL + MaxStale after it was sealed, plus a margin for the writer's
//     clock and write delay);
//   - the floor: a TRUNCATE, or changes missed that could not be caught up
//     on, or memory given up to stay bounded.
//
// A change named without a sequence (a Redis bus message) makes shared
// entries of its keys ignored for tombWindow, as before versions.

// rememberMargin is added to TTL + MaxStale: clocks of replicas apart by
// up to a minute (the bus's MessageWindow), and a write that lands a
// lookup's and a write's timeouts after the read.
const rememberMargin = time.Minute

// maxRemembered bounds the per-key memory. Past it, the oldest changes are
// folded into the floor: every shared entry read before the newest of them
// is refused (more store lookups for a while, never a stale allow).
const maxRemembered = 1 << 17

type keyChange struct {
	seq   int64 // latest change sequence of the key heard of; 0: none
	tomb  int64 // unix ns until which its shared entries are ignored
	until int64 // unix ns when this memory may go
}

// remember records what c tells about versions, before the caches are
// invalidated (a lookup that reads the shared tier in between is undone by
// the invalidation counter).
func (a *Authenticator) remember(c Change) {
	now := a.opts.Now().UnixNano()
	a.raiseFloor(c.Floor)
	if c.All && c.Floor == 0 {
		a.tombAll.Store(now + int64(a.tombWindow))
	}
	if len(c.KeyIDs) == 0 {
		return
	}
	a.memMu.Lock()
	defer a.memMu.Unlock()
	for i, id := range c.KeyIDs {
		kc := a.mem[id]
		kc.until = max(kc.until, now+int64(a.memFor))
		if i < len(c.Seqs) && c.Seqs[i] > 0 {
			kc.seq = max(kc.seq, c.Seqs[i])
		} else {
			kc.tomb = max(kc.tomb, now+int64(a.tombWindow))
		}
		a.mem[id] = kc
	}
	if len(a.mem) > maxRemembered {
		a.compactLocked(now)
	}
}

// compactLocked forgets what may be forgotten and, if that is not enough,
// folds the rest into the floor.
func (a *Authenticator) compactLocked(now int64) {
	for id, kc := range a.mem {
		if kc.until <= now {
			delete(a.mem, id)
		}
	}
	if len(a.mem) <= maxRemembered/2 {
		return
	}
	var top int64
	tombs := false
	for _, kc := range a.mem {
		top = max(top, kc.seq)
		tombs = tombs || kc.tomb > now
	}
	a.raiseFloor(top)
	if tombs {
		a.tombAll.Store(max(a.tombAll.Load(), now+int64(a.tombWindow)))
	}
	clear(a.mem)
	a.log.Warn("too many recent key changes to remember each; shared entries read before the latest are refused",
		zap.Int64("floor", top))
}

func (a *Authenticator) raiseFloor(seq int64) {
	for {
		f := a.floor.Load()
		if seq <= f || a.floor.CompareAndSwap(f, seq) {
			return
		}
	}
}

// adoptable reports whether a shared entry may be used: it was not made of
// a key state older than a change this replica knows of. A refused entry
// is counted and deleted: it can only cost lookups from now on.
func (a *Authenticator) adoptable(k Digest, e *sharedEntry, now int64) bool {
	if now < a.tombAll.Load() {
		return false
	}
	if e.keyID == "" {
		return true // an unknown credential: no key, no version
	}
	ok := e.version >= a.floor.Load()
	if ok {
		a.memMu.Lock()
		kc, known := a.mem[e.keyID]
		a.memMu.Unlock()
		if known && now < kc.tomb {
			return false // a change without a sequence: ignore for a while
		}
		ok = !known || e.version >= kc.seq
	}
	if !ok {
		a.stats.SharedOutdated.Add(1)
		a.deleteShared(k)
	}
	return ok
}
