// A warmed Go function, used as a mitosis seed.
//
// Go brings its own runtime rather than libc's: threads it makes with raw clone calls (one
// per P, a sysmon thread, more for blocking calls), its own signal handling (os/signal's
// handler thread), a netpoller and timers, and a garbage collector that stops every
// goroutine. Start-up builds warm state (a word table of SHA-1 digests, a map of 50,000
// entries, a DEFLATE blob), starts a pool of worker goroutines fed through channels and a
// ticker goroutine, collects garbage once, answers one request internally and prints `ready`.
// Then every line on stdin gets one JSON line on stdout, "pid" last:
//
//	{"n": 5} -> {"n": 5, "word": ..., "digest": ..., "value": ..., "deflated": ...,
//	             "roundtrip": true, "gc": true, "ticking": true, "threads": T, "pid": P}
//
// "digest" comes from the workers (each hashes a slice of the table), so a child whose
// scheduler or channels did not come along never answers; "gc" says a collection ran and
// finished; "ticking" that the ticker goroutine's timer fired while the request waited for
// it. "threads" is the thread count of the process (/proc/self/task), "pid" the pid of the
// process answering (read from /proc/self). A SIGUSR1 writes the line `usr1`. EOF on stdin:
// exit 0.
//
//	{"spin": true} -> {"spin": "done", "threads": T, "pid": P}: a goroutine spins while a
//	                  collection runs (spinDuringCollection): it needs Go's preemption.
//
//	--once   answer one request (the first line) and exit 0: the cold start baseline and
//	         the reference answer.
//
// Build: go build -o fn examples/go/fn.go (standard library only).
package main

import (
	"bufio"
	"bytes"
	"compress/flate"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	entries = 50000
	workers = 4
)

type state struct {
	words    []string
	table    map[int]int
	blob     []byte
	deflated []byte
}

type job struct {
	from, to int
	out      chan<- [32]byte
}

var (
	warm  state
	jobs  = make(chan job)
	ticks atomic.Int64
	// One writer at a time on stdout: answers and the SIGUSR1 line.
	outMu sync.Mutex
)

func buildState() state {
	s := state{table: make(map[int]int, entries)}
	for i := 0; i < 512; i++ {
		sum := sha1.Sum([]byte(fmt.Sprintf("word-%d", i)))
		s.words = append(s.words, hex.EncodeToString(sum[:])[:4+i%9])
	}
	for i := 0; i < entries; i++ {
		s.table[i] = (i * 7919) % 10007
	}
	var text bytes.Buffer
	for i := 0; i < 8; i++ {
		for _, w := range s.words {
			text.WriteString(w)
			text.WriteByte(' ')
		}
	}
	s.blob = text.Bytes()
	s.deflated = deflate(s.blob)
	return s
}

func deflate(data []byte) []byte {
	var out bytes.Buffer
	w, err := flate.NewWriter(&out, flate.BestCompression)
	if err != nil {
		panic(err)
	}
	w.Write(data)
	w.Close()
	return out.Bytes()
}

// worker hashes the table's values over [from, to) for whoever asked.
func worker() {
	for j := range jobs {
		h := sha256.New()
		for i := j.from; i < j.to; i++ {
			fmt.Fprintf(h, "%d,", warm.table[i%entries])
		}
		var sum [32]byte
		copy(sum[:], h.Sum(nil))
		j.out <- sum
	}
}

func abs(n int) int {
	if n < 0 {
		return -n
	}
	return n
}

func answer(n int) map[string]any {
	word := warm.words[abs(n)%len(warm.words)]
	// Four slices of the table, one per worker; combined in slice order.
	outs := make([]chan [32]byte, workers)
	for k := range outs {
		outs[k] = make(chan [32]byte, 1)
		from := abs(n)*13 + k*2000
		jobs <- job{from: from, to: from + 2000, out: outs[k]}
	}
	all := sha256.New()
	for _, out := range outs {
		sum := <-out
		all.Write(sum[:])
	}
	gcs := func() uint32 {
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.NumGC
	}
	before := gcs()
	runtime.GC()
	tick := ticks.Load()
	deadline := time.Now().Add(2 * time.Second)
	for ticks.Load() == tick && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	inflated, err := io.ReadAll(flate.NewReader(bytes.NewReader(warm.deflated)))
	payload := append(append([]byte{}, warm.blob[:256+abs(n)%1024]...), word...)
	return map[string]any{
		"n":         n,
		"word":      word,
		"digest":    hex.EncodeToString(all.Sum(nil))[:16],
		"value":     warm.table[abs(n)%entries],
		"deflated":  len(deflate(payload)),
		"roundtrip": err == nil && bytes.Equal(inflated, warm.blob),
		"gc":        gcs() > before,
		"ticking":   ticks.Load() != tick,
	}
}

// spinDuringCollection spins a goroutine, without a call in its loop, until another one sets
// a flag 50 ms later, and collects garbage meanwhile: the collection must stop the spinning
// goroutine, which only a signal to its thread can (Go's asynchronous preemption). Where
// that signal finds no thread the collection waits for the loop, and the loop for the
// goroutine that the collection stopped: it never ends.
func spinDuringCollection() map[string]any {
	var flag atomic.Int32
	done := make(chan struct{})
	go func() {
		for flag.Load() == 0 {
		}
		close(done)
	}()
	go func() {
		time.Sleep(50 * time.Millisecond)
		flag.Store(1)
	}()
	time.Sleep(10 * time.Millisecond)
	runtime.GC()
	<-done
	return map[string]any{"spin": "done"}
}

func reply(line []byte) []byte {
	var req struct {
		N    *int `json:"n"`
		Spin bool `json:"spin"`
	}
	var out map[string]any
	if err := json.Unmarshal(line, &req); err != nil || (req.N == nil && !req.Spin) {
		out = map[string]any{"error": fmt.Sprintf("bad request: %q", line)}
	} else if req.Spin {
		out = spinDuringCollection()
	} else {
		out = answer(*req.N)
	}
	tasks, _ := os.ReadDir("/proc/self/task")
	self, _ := os.Readlink("/proc/self")
	var pid int
	fmt.Sscan(self, &pid)
	// encoding/json writes a map's keys in order; "pid" and "threads" are appended last.
	body, _ := json.Marshal(out)
	return append(body[:len(body)-1], fmt.Sprintf(`,"threads":%d,"pid":%d}`+"\n", len(tasks), pid)...)
}

func write(b []byte) {
	outMu.Lock()
	defer outMu.Unlock()
	os.Stdout.Write(b)
}

func main() {
	once := false
	for _, a := range os.Args[1:] {
		if a != "--once" {
			fmt.Fprintln(os.Stderr, "usage: fn [--once]")
			os.Exit(2)
		}
		once = true
	}
	warm = buildState()
	for i := 0; i < workers; i++ {
		go worker()
	}
	go func() {
		for range time.NewTicker(2 * time.Millisecond).C {
			ticks.Add(1)
		}
	}()
	in := bufio.NewScanner(os.Stdin)
	if once {
		if in.Scan() {
			write(reply(in.Bytes()))
		}
		return
	}
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	go func() {
		for range usr1 {
			write([]byte("usr1\n"))
		}
	}()
	reply([]byte(`{"n": 0}`))
	runtime.GC()
	write([]byte("ready\n"))
	for in.Scan() {
		if len(bytes.TrimSpace(in.Bytes())) > 0 {
			write(reply(in.Bytes()))
		}
	}
}
