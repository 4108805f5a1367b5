// A warmed JVM function, used as a mitosis seed.
//
// Start-up loads and uses java.util.regex, java.security.MessageDigest and java.util.stream,
// builds warm state (a word table and a table of digests), answers requests internally until
// the hot methods are compiled, installs a SIGUSR1 handler, prints `ready` and then reads
// request lines from System.in (the main Java thread blocks in read(0)); one answer line
// each, "pid" last:
//
//   {"n": 5} -> {"n": 5, "word": "...", "sha256": "...", "matches": M, "sum": S,
//                "joined": "...", "threads": T, "pid": P}
//
// "threads" is the thread count of the process at that moment (/proc/self/task), "pid" the
// pid of the process answering (read from /proc/self, which the JVM does not cache). A
// SIGUSR1 prints the line `usr1` (sun.misc.Signal; the JVM runs the handler in a thread of
// its own). EOF on stdin: exit 0.
//
//   --once   answer the first request line and exit (the cold start baseline and the
//            reference answer).
//
// Run it as a seed with `java -XX:-UsePerfData -Xshare:off -cp DIR Fn`: perf data is a
// shared file mapping in /tmp, and the class-data-sharing archive a file mapping a child
// does not need.

import java.io.BufferedReader;
import java.io.File;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.stream.Collectors;
import java.util.stream.IntStream;

public final class Fn {
    private static final Pattern REQUEST = Pattern.compile("\\{\\s*\"n\"\\s*:\\s*(-?\\d+)\\s*}");
    private static final Pattern VOWELS = Pattern.compile("[aeiou][a-z]");
    private static final PrintStream OUT =
            new PrintStream(new java.io.FileOutputStream(java.io.FileDescriptor.out), false, StandardCharsets.UTF_8);

    private final List<String> words = new ArrayList<>();
    private final long[] table;

    private Fn() throws NoSuchAlgorithmException {
        String[] syllables = {"ka", "lo", "mi", "to", "se", "nu", "ra", "pe", "di", "go"};
        for (int i = 0; i < 1000; i++) {
            StringBuilder w = new StringBuilder();
            for (int k = i; ; k /= 10) {
                w.append(syllables[k % 10]);
                if (k < 10) {
                    break;
                }
            }
            words.add(w.toString());
        }
        table = IntStream.range(0, 4096).mapToLong(i -> digestLong("table-" + i)).toArray();
    }

    private static long digestLong(String text) {
        byte[] d = sha256(text);
        long v = 0;
        for (int i = 0; i < 8; i++) {
            v = (v << 8) | (d[i] & 0xff);
        }
        return v;
    }

    private static byte[] sha256(String text) {
        try {
            return MessageDigest.getInstance("SHA-256").digest(text.getBytes(StandardCharsets.UTF_8));
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    private static int threadCount() {
        String[] tasks = new File("/proc/self/task").list();
        return tasks == null ? -1 : tasks.length;
    }

    private static String livePid() {
        try {
            return Files.readSymbolicLink(Path.of("/proc/self")).toString();
        } catch (IOException e) {
            return "-1";
        }
    }

    private String answer(String line) {
        Matcher m = REQUEST.matcher(line.trim());
        if (!m.matches()) {
            return "{\"error\": \"bad request\", \"threads\": " + threadCount() + ", \"pid\": " + livePid() + "}";
        }
        int n = Integer.parseInt(m.group(1));
        int at = Math.floorMod(n, words.size());
        String word = words.get(at);
        String sha = HexFormat.of().formatHex(sha256(word + ":" + n)).substring(0, 16);
        long matches = VOWELS.matcher(String.join("", words.subList(0, at + 1))).results().count();
        long sum = IntStream.rangeClosed(0, Math.floorMod(n, 4096)).mapToLong(i -> table[i] >>> 40).sum();
        String joined = words.stream()
                .skip(at)
                .limit(4)
                .map(String::toUpperCase)
                .collect(Collectors.joining("-"));
        return String.format(
                "{\"n\": %d, \"word\": \"%s\", \"sha256\": \"%s\", \"matches\": %d, \"sum\": %d, \"joined\": \"%s\", "
                        + "\"threads\": %d, \"pid\": %s}",
                n, word, sha, matches, sum, joined, threadCount(), livePid());
    }

    private static void println(String line) {
        synchronized (OUT) {
            OUT.print(line);
            OUT.print('\n');
            OUT.flush();
        }
    }

    public static void main(String[] args) throws Exception {
        boolean once = args.length == 1 && args[0].equals("--once");
        if (args.length > 0 && !once) {
            System.err.println("usage: java Fn [--once]");
            System.exit(2);
        }
        Fn fn = new Fn();
        if (!once) {
            // Enough calls for the JIT to compile the request path before the seed is ready.
            for (int i = 0; i < 2000; i++) {
                fn.answer("{\"n\": " + i + "}");
            }
            sun.misc.Signal.handle(new sun.misc.Signal("USR1"), sig -> println("usr1"));
            println("ready");
        }
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            if (line.isBlank()) {
                continue;
            }
            println(fn.answer(line));
            if (once) {
                break;
            }
        }
        OUT.flush();
        System.exit(0);
    }
}
