package main

import (
	"bufio"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// summary reads result lines (key=value), groups them by label and
// concurrency, and prints the medians and each label's ratios to the
// noop and ideal baselines of the same concurrency.
func summary(in io.Reader, out io.Writer) {
	type key struct{ label, c string }
	vals := map[key]map[string][]float64{}
	var order []key
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		f := map[string]string{}
		for _, kv := range strings.Fields(sc.Text()) {
			if k, v, ok := strings.Cut(kv, "="); ok {
				f[k] = v
			}
		}
		if f["label"] == "" || f["rps"] == "" {
			continue
		}
		k := key{f["label"], f["c"]}
		if vals[k] == nil {
			vals[k] = map[string][]float64{}
			order = append(order, k)
		}
		for _, m := range []string{"rps", "p50_ms", "p99_ms", "server_cpu_us_per_req", "errors", "denied"} {
			if v, err := strconv.ParseFloat(f[m], 64); err == nil {
				vals[k][m] = append(vals[k][m], v)
			}
		}
	}
	median := func(xs []float64) float64 {
		if len(xs) == 0 {
			return 0
		}
		s := slices.Clone(xs)
		slices.Sort(s)
		return s[len(s)/2]
	}
	sum := func(xs []float64) (t float64) {
		for _, x := range xs {
			t += x
		}
		return t
	}
	fmt.Fprintf(out, "%-10s %4s %5s %9s %8s %8s %10s %6s %6s | %-26s | %-26s\n",
		"server", "c", "runs", "rps", "p50_ms", "p99_ms", "cpu_us/req", "errors", "denied", "vs noop: rps p99 cpu", "vs ideal: rps p99 cpu")
	for _, k := range order {
		v := vals[k]
		ratio := func(base string) string {
			b := vals[key{base, k.c}]
			if b == nil || median(b["rps"]) == 0 {
				return "-"
			}
			r := func(m string) string {
				if median(b[m]) == 0 {
					return "-"
				}
				return fmt.Sprintf("%.2f", median(v[m])/median(b[m]))
			}
			return fmt.Sprintf("%s %s %s", r("rps"), r("p99_ms"), r("server_cpu_us_per_req"))
		}
		fmt.Fprintf(out, "%-10s %4s %5d %9.0f %8.3f %8.3f %10.1f %6.0f %6.0f | %-26s | %-26s\n",
			k.label, k.c, len(v["rps"]), median(v["rps"]), median(v["p50_ms"]), median(v["p99_ms"]),
			median(v["server_cpu_us_per_req"]), sum(v["errors"]), sum(v["denied"]), ratio("noop"), ratio("ideal"))
	}
}
