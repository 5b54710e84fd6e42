package tokens

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// usageSink is an in-memory UsageWriter.
type usageSink struct {
	mu      sync.Mutex
	batches [][]Usage
	fail    bool
}

func (s *usageSink) RecordUsage(_ context.Context, us []Usage) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail {
		return errors.New("store down")
	}
	s.batches = append(s.batches, append([]Usage(nil), us...))
	return nil
}

func (s *usageSink) totals() map[string]int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]int64{}
	for _, b := range s.batches {
		for _, u := range b {
			out[u.KeyID] += u.Requests
		}
	}
	return out
}

func TestUsageAggregatesAndWritesInBatches(t *testing.T) {
	t.Parallel()
	clock := &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	sink := &usageSink{}
	r := NewUsageRecorder(sink, UsageOptions{BatchSize: 2, Now: clock.Now})
	for i := range 5 {
		clock.Add(time.Second)
		r.Record("a")
		r.Record(fmt.Sprint("k", i))
	}
	if err := r.Flush(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(map[string]int64{"a": 5, "k0": 1, "k1": 1, "k2": 1, "k3": 1, "k4": 1}, sink.totals()); d != "" {
		t.Fatalf("(-want +got):\n%s", d)
	}
	if len(sink.batches) != 3 {
		t.Fatalf("%d batches for 6 keys of 2, want 3", len(sink.batches))
	}
	for _, b := range sink.batches {
		for _, u := range b {
			if u.KeyID == "a" && !u.LastUsed.Equal(clock.Now()) {
				t.Errorf("last used %v, want the latest %v", u.LastUsed, clock.Now())
			}
		}
	}
	if r.Pending() != 0 || r.Written() != 6 {
		t.Fatalf("pending %d written %d", r.Pending(), r.Written())
	}
}

func TestUsageBoundedMemory(t *testing.T) {
	t.Parallel()
	r := NewUsageRecorder(&usageSink{}, UsageOptions{MaxPending: 3})
	for i := range 10 {
		r.Record(fmt.Sprint("k", i))
	}
	r.Record("k0") // known keys still count
	if r.Pending() != 3 || r.Dropped() != 7 {
		t.Fatalf("pending %d dropped %d, want 3 and 7", r.Pending(), r.Dropped())
	}
}

func TestUsageKeptWhenWriteFails(t *testing.T) {
	t.Parallel()
	sink := &usageSink{fail: true}
	r := NewUsageRecorder(sink, UsageOptions{})
	r.Record("a")
	r.Record("a")
	if err := r.Flush(context.Background(), false); err == nil {
		t.Fatal("flush to a failing store succeeded")
	}
	r.Record("a")
	sink.fail = false
	if err := r.Flush(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if got := sink.totals()["a"]; got != 3 {
		t.Fatalf("a = %d after a failed write, want 3 (nothing lost)", got)
	}
}

// fakeGate lets this replica win only the keys in won.
type fakeGate struct {
	won map[string]bool
	err error
}

func (g fakeGate) Claim(_ context.Context, ids []string, _ time.Duration) ([]bool, error) {
	out := make([]bool, len(ids))
	for i, id := range ids {
		out[i] = g.won[id]
	}
	return out, g.err
}

func TestUsageGate(t *testing.T) {
	t.Parallel()
	sink := &usageSink{}
	r := NewUsageRecorder(sink, UsageOptions{Gate: fakeGate{won: map[string]bool{"mine": true}}})
	r.Record("mine")
	r.Record("theirs")
	if err := r.Flush(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(map[string]int64{"mine": 1}, sink.totals()); d != "" {
		t.Fatalf("gated flush (-want +got):\n%s", d)
	}
	if r.Pending() != 1 {
		t.Fatalf("lost key not kept: pending %d", r.Pending())
	}
	r.Record("theirs")
	// The final flush at shutdown writes everything, gate or not.
	if err := r.Flush(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(map[string]int64{"mine": 1, "theirs": 2}, sink.totals()); d != "" {
		t.Fatalf("final flush (-want +got):\n%s", d)
	}
	// A gate that fails: write anyway.
	r2 := NewUsageRecorder(sink, UsageOptions{Gate: fakeGate{err: errors.New("redis down")}})
	r2.Record("x")
	if err := r2.Flush(context.Background(), false); err != nil || sink.totals()["x"] != 1 {
		t.Fatalf("gate down: %v, x=%d", err, sink.totals()["x"])
	}
}

func TestUsageRunFlushesOnStop(t *testing.T) {
	t.Parallel()
	sink := &usageSink{}
	r := NewUsageRecorder(sink, UsageOptions{Interval: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx, time.Second); close(done) }()
	r.Record("a")
	cancel()
	<-done
	if sink.totals()["a"] != 1 {
		t.Fatal("pending usage not written when Run stopped")
	}
}

func TestUsageConcurrent(t *testing.T) {
	t.Parallel()
	sink := &usageSink{}
	r := NewUsageRecorder(sink, UsageOptions{})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 1000 {
				r.Record(fmt.Sprint("k", (g+i)%10))
				if i%250 == 0 {
					r.Flush(context.Background(), false)
				}
			}
		})
	}
	wg.Wait()
	r.Flush(context.Background(), false)
	var total int64
	keys := []string{}
	for k, n := range sink.totals() {
		total += n
		keys = append(keys, k)
	}
	sort.Strings(keys)
	if total != 8000 || len(keys) != 10 {
		t.Fatalf("total %d over %d keys, want 8000 over 10", total, len(keys))
	}
}

func BenchmarkUsageRecord(b *testing.B) {
	r := NewUsageRecorder(&usageSink{}, UsageOptions{})
	b.ReportAllocs()
	for b.Loop() {
		r.Record("3f6c1a52-9b1e-4d7a-8f0e-2c4b6d8e0a1b")
	}
}

// wholeSink asks for all pending usage in one write, as the file store does.
type wholeSink struct{ usageSink }

func (*wholeSink) UsageBatchSize() int { return 0 }

// A writer's own batch size applies unless the options set one.
func TestUsageWriterBatchSize(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		w       interface{ batchCount() int }
		opts    UsageOptions
		batches int
	}{
		{"default", &usageSink{}, UsageOptions{}, 3},
		{"writer asks for one", &wholeSink{}, UsageOptions{}, 1},
		{"options win", &wholeSink{}, UsageOptions{BatchSize: 500}, 5},
	} {
		r := NewUsageRecorder(tc.w.(UsageWriter), tc.opts)
		for i := range 2500 {
			r.Record(fmt.Sprint("k", i))
		}
		if err := r.Flush(context.Background(), true); err != nil {
			t.Fatal(err)
		}
		if got := tc.w.batchCount(); got != tc.batches {
			t.Errorf("%s: %d writes for 2,500 keys, want %d", tc.name, got, tc.batches)
		}
	}
}

func (s *usageSink) batchCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.batches)
}

// Ids are held by value up to 36 bytes and as strings beyond: each id
// keeps its own count whatever its length, trailing zero bytes included,
// and failed writes merge back into the same entries.
func TestUsageKeyIDLengths(t *testing.T) {
	t.Parallel()
	uuid := "3f6c1a52-9b1e-4d7a-8f0e-2c4b6d8e0a1b"
	ids := []string{"", "k", "k\x00", uuid, uuid + "x", strings.Repeat("y", 200)}
	sink := &usageSink{fail: true}
	r := NewUsageRecorder(sink, UsageOptions{})
	want := map[string]int64{}
	for i, id := range ids {
		for range i + 1 {
			r.Record(id)
		}
		want[id] = int64(i + 1)
	}
	if r.Pending() != len(ids) {
		t.Fatalf("pending %d, want %d", r.Pending(), len(ids))
	}
	if err := r.Flush(context.Background(), false); err == nil {
		t.Fatal("flush to a failing sink succeeded")
	}
	for _, id := range ids {
		r.Record(id)
		want[id]++
	}
	sink.mu.Lock()
	sink.fail = false
	sink.mu.Unlock()
	if err := r.Flush(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, sink.totals()); d != "" {
		t.Fatalf("(-want +got):\n%s", d)
	}
	if r.Pending() != 0 {
		t.Fatalf("pending %d after a full write", r.Pending())
	}
}

// What pending usage holds by value must stay free of pointers, or the
// garbage collector scans every pending key again (see usageShard).
func TestUsagePendingHoldsNoPointers(t *testing.T) {
	t.Parallel()
	for _, typ := range []reflect.Type{reflect.TypeFor[usageID](), reflect.TypeFor[usageCount]()} {
		if hasPointers(typ) {
			t.Errorf("%v holds pointers", typ)
		}
	}
}

func hasPointers(t reflect.Type) bool {
	switch t.Kind() {
	case reflect.Array:
		return t.Len() > 0 && hasPointers(t.Elem())
	case reflect.Struct:
		for i := range t.NumField() {
			if hasPointers(t.Field(i).Type) {
				return true
			}
		}
		return false
	case reflect.Pointer, reflect.UnsafePointer, reflect.String, reflect.Slice, reflect.Map,
		reflect.Chan, reflect.Func, reflect.Interface:
		return true
	}
	return false
}

// A gate that never lets this replica win (another replica holding every
// claim, or whoever can write to Redis setting them) delays a key's write
// by one interval, not more.
func TestUsageGateDelaysOneIntervalAtMost(t *testing.T) {
	t.Parallel()
	sink := &usageSink{}
	gate := &countingGate{}
	r := NewUsageRecorder(sink, UsageOptions{Gate: gate})
	r.Record("a")
	r.Record("b")
	if err := r.Flush(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if len(sink.totals()) != 0 || r.Pending() != 2 {
		t.Fatalf("first flush wrote %v, pending %d; want nothing written, 2 pending", sink.totals(), r.Pending())
	}
	r.Record("a")
	r.Record("c")
	if err := r.Flush(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(map[string]int64{"a": 2, "b": 1}, sink.totals()); d != "" {
		t.Fatalf("second flush (-want +got):\n%s", d)
	}
	if d := cmp.Diff([][]string{{"a", "b"}, {"c"}}, gate.asked); d != "" {
		t.Fatalf("keys claimed (-want +got):\n%s", d)
	}
	// c, deferred by the second flush, goes with the third.
	if err := r.Flush(context.Background(), false); err != nil || sink.totals()["c"] != 1 {
		t.Fatalf("third flush: %v, c = %d", err, sink.totals()["c"])
	}
}

// countingGate never lets this replica win, and records what it was asked.
type countingGate struct{ asked [][]string }

func (g *countingGate) Claim(_ context.Context, ids []string, _ time.Duration) ([]bool, error) {
	g.asked = append(g.asked, slices.Clone(ids))
	return make([]bool, len(ids)), nil
}

// flakySink fails its first n writes.
type flakySink struct {
	usageSink
	n int
}

func (s *flakySink) RecordUsage(ctx context.Context, us []Usage) error {
	s.mu.Lock()
	fail := s.n > 0
	s.n--
	s.mu.Unlock()
	if fail {
		return errors.New("deadlock detected")
	}
	return s.usageSink.RecordUsage(ctx, us)
}

// The write at shutdown is retried until its deadline: a store that failed
// a write or two (a deadlock with another replica's final write, a
// restart) still gets every count.
func TestUsageFinalWriteRetries(t *testing.T) {
	t.Parallel()
	sink := &flakySink{n: 3}
	r := NewUsageRecorder(sink, UsageOptions{Interval: time.Hour, Gate: fakeGate{}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx, 10*time.Second); close(done) }()
	for i := range 3000 {
		r.Record(fmt.Sprint("k", i%1500))
	}
	cancel()
	<-done
	var total int64
	for _, n := range sink.totals() {
		total += n
	}
	if total != 3000 || r.Pending() != 0 {
		t.Fatalf("written %d of 3000 requests, %d keys pending", total, r.Pending())
	}
}

// Batches are cut from key ids in order, so every replica locks rows alike.
func TestUsageBatchesInKeyOrder(t *testing.T) {
	t.Parallel()
	sink := &usageSink{}
	r := NewUsageRecorder(sink, UsageOptions{BatchSize: 10})
	for i := range 95 {
		r.Record(fmt.Sprintf("k%03d", 94-i))
	}
	if err := r.Flush(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, b := range sink.batches {
		for _, u := range b {
			ids = append(ids, u.KeyID)
		}
	}
	if !slices.IsSorted(ids) || len(ids) != 95 {
		t.Fatalf("written in the order %v", ids)
	}
}
